"""Checkpointing and fault tolerance (SPEC §6): exact resume after SIGTERM, restore onto
other meshes and device counts, a save killed half-way, and clear errors for bad
checkpoints that delete nothing.

One tiny experiment (1-layer LM, 1-stage NFNet at 32 px, one pairs task) runs 20 steps
uninterrupted (run A); the other tests restart from copies of its checkpoints, so the
session compiles the train step for three meshes only.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from data_pipelines import synthetic, tokenizer, train_tokenizer
from flamingo_jax import distributed
from flamingo_jax.checkpointing import Checkpointer, CheckpointError
from flamingo_jax.train import make_input, to_microbatches, train
from flamingo_jax.trainer import Trainer

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 20

CONFIG_PY = """\
from experiments import demo


def get_config(arg=None):
    config = demo.get_config()
    config.model.vision.update(widths=(16,), depths=(1,), stem_widths=(8,))
    config.model.lm.update(vocab_size={vocab_size}, num_layers=1, max_length=16)
    config.model.resampler.num_layers = 1
    config.input.update(image_size=32, num_media=1, text_length=16)
    config.data.tokenizer = {spm!r}
    config.data.tasks = {{"pairs": dict(kind="pairs", source="webdataset", path={pairs!r},
                                       batch_size=8, text_length=16)}}
    config.train.task_weights = {{"pairs": 1.0}}
    config.train.update(num_steps={num_steps}, log_every=1)
    config.optimizer.update(lr=1e-3, warmup_steps=2)
    config.checkpoint.update(save_every=5, keep=1, keep_every=10)
    if arg == "mesh222":
        config.mesh.update(data=2, fsdp=2, tensor=2)
    return config
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Path of a config file usable by `flamingo-train --config` and in this process."""
    root = str(tmp_path_factory.mktemp("ckpt_data"))
    paths = synthetic.write_all(root, seed=0, image_size=32, num_docs=2, num_pairs=48,
                                num_clips=1, num_frames=2, num_eval=1, num_shards=2)
    spm = train_tokenizer.train_sentencepiece([paths["corpus"]], os.path.join(root, "spm"),
                                              vocab_size=300)
    path = os.path.join(root, "tiny_experiment.py")
    with open(path, "w") as f:
        f.write(CONFIG_PY.format(vocab_size=tokenizer.load_vocabulary(spm).base_vocab_size,
                                 spm=spm, pairs=paths["webdataset"], num_steps=NUM_STEPS))
    return path


def _config(path, arg=None):
    spec = importlib.util.spec_from_file_location("tiny_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _env(num_devices=8):
    """A subprocess sharing this session's compilation cache."""
    return {**os.environ, "PYTHONPATH": REPO,
            "XLA_FLAGS": xla_flags(num_devices),
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _records(workdir):
    """metrics.jsonl's complete lines (a running process may be writing the last one)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _assert_bitwise_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(_host(a))
    leaves_b, tree_b = jax.tree_util.tree_flatten(_host(b))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def trainer(experiment):
    """Run A's trainer (mesh (1, 8, 1)); only its shardings and step are used."""
    return Trainer(_config(experiment))


def _restore(trainer, workdir, step):
    checkpointer = Checkpointer(workdir, keep=1)
    try:
        return checkpointer.restore(step, jax.eval_shape(trainer._init), trainer.state_shardings)
    finally:
        checkpointer.close()


@pytest.fixture(scope="module")
def run_a(experiment, tmp_path_factory):
    """20 uninterrupted steps, a checkpoint every 5, keep 1 plus every 10th."""
    workdir = str(tmp_path_factory.mktemp("run_a"))
    train(_config(experiment), workdir)
    return workdir


def _copy(run_a, tmp_path, steps=("10", "20")):
    """A workdir holding run A's frozen params and checkpoints `steps`."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(os.path.join(run_a, "frozen"), os.path.join(workdir, "frozen"))
    for step in steps:
        shutil.copytree(os.path.join(run_a, "checkpoints", step),
                        os.path.join(workdir, "checkpoints", step))
    return workdir


def test_keep_n_plus_every_m(run_a):
    # Saved at 5, 10, 15, 20: the newest (20) stays and so does every 10th.
    assert sorted(os.listdir(os.path.join(run_a, "checkpoints")), key=int) == ["10", "20"]
    assert [r["step"] for r in _records(run_a)] == list(range(1, NUM_STEPS + 1))


def test_sigterm_then_restart_resumes_exactly(experiment, run_a, trainer, tmp_path):
    workdir = str(tmp_path / "run_b")
    command = [sys.executable, "-m", "flamingo_jax.train", "--config", experiment,
               "--workdir", workdir]
    first = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    while first.poll() is None:  # SIGTERM once step 10 is logged
        if any(r["step"] >= 10 for r in _records(workdir)):
            first.send_signal(signal.SIGTERM)
            break
        try:
            first.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    out = first.communicate()[0].decode()
    assert first.returncode == 0, out[-3000:]
    stopped = _records(workdir)[-1]["step"]
    assert 10 <= stopped < NUM_STEPS, "the run ended before SIGTERM arrived"
    assert str(stopped) in os.listdir(os.path.join(workdir, "checkpoints"))

    second = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records_a, records_b = _records(run_a), _records(workdir)
    assert [r["step"] for r in records_b] == list(range(1, NUM_STEPS + 1))
    for a, b in zip(records_a[stopped:], records_b[stopped:]):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    state_a, data_a = _restore(trainer, run_a, NUM_STEPS)
    state_b, data_b = _restore(trainer, workdir, NUM_STEPS)
    _assert_bitwise_equal(state_a, state_b)  # trainable, frozen, Adam moments, RNG, step
    assert data_a == data_b


def _continue(trainer, state, host_batches):
    losses = []
    for host in host_batches:
        state, metrics = trainer.step(state, trainer.shard_batches(host))
        losses.append(float(metrics["loss"]))
    return losses


LOAD_CONFIG = """
import importlib.util
import jax
from flamingo_jax.checkpointing import Checkpointer
from flamingo_jax.trainer import Trainer
spec = importlib.util.spec_from_file_location("tiny_experiment", {experiment!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
trainer = Trainer(module.get_config())
"""

RESTORE_ON_TWO_DEVICES = LOAD_CONFIG + """
import json
import numpy as np
assert trainer.mesh.devices.shape == (1, 2, 1), trainer.mesh
state, _ = Checkpointer({workdir!r}, keep=1).restore(
    10, jax.eval_shape(trainer._init), trainer.state_shardings)
saved = np.load({batches!r})
losses = []
for i in range(2):
    host = {{"pairs": {{k[2:]: saved[k] for k in saved.files if k[0] == str(i)}}}}
    state, metrics = trainer.step(state, trainer.shard_batches(host))
    losses.append(float(metrics["loss"]))
print("LOSSES", json.dumps(losses))
"""


def test_restore_onto_other_meshes(experiment, run_a, trainer, tmp_path):
    config = _config(experiment)
    records_a = _records(run_a)
    # Run A's step 10 onto mesh (2, 2, 2), saved there.
    trainer_222 = Trainer(_config(experiment, "mesh222"))
    state, data_state = _restore(trainer_222, run_a, 10)
    assert state.trainable["lm/xattn_0/q/kernel"].sharding == \
        trainer_222.state_shardings.trainable["lm/xattn_0/q/kernel"]
    workdir = str(tmp_path / "mesh222")
    checkpointer = Checkpointer(workdir, keep=1, config=config)
    checkpointer.save(10, state, data_state)
    checkpointer.wait()
    checkpointer.close()
    # The batches of steps 11 and 12, as the train loop reads them.
    batches = make_input(config, distributed.input_state_for_process(data_state, 0, 1))
    hosts = [{t: to_microbatches(b, 1) for t, b in next(batches).items()} for _ in range(2)]
    batches.close()
    losses_222 = _continue(trainer_222, state, hosts)

    # ... restored onto (1, 8, 1): the uninterrupted run A's own losses, bit for bit.
    state_181, data_181 = _restore(trainer, workdir, 10)
    assert data_181 == data_state
    losses_181 = _continue(trainer, state_181, hosts)
    assert losses_181 == [r["loss"] for r in records_a[10:12]]
    np.testing.assert_allclose(losses_222, losses_181, rtol=1e-5)

    # ... and in a 2-device process (mesh (1, 2, 1)).
    np.savez(str(tmp_path / "batches.npz"),
             **{f"{i}_{k}": v for i, host in enumerate(hosts) for k, v in host["pairs"].items()})
    script = RESTORE_ON_TWO_DEVICES.format(experiment=experiment, workdir=workdir,
                                           batches=str(tmp_path / "batches.npz"))
    done = subprocess.run([sys.executable, "-c", script], env=_env(num_devices=2), cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    losses_2 = json.loads(done.stdout.split("LOSSES")[-1])
    np.testing.assert_allclose(losses_2, losses_181, rtol=1e-5)


KILLED_DURING_SAVE = LOAD_CONFIG + """
import asyncio
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def finalize_never(self):
    # Every file of step 11 is written; the rename that completes it never happens.
    if self.get_final().name == "11":
        open({marker!r}, "w").close()
        await asyncio.Event().wait()
    return await finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = finalize_never
checkpointer = Checkpointer({workdir!r}, keep=5)
state, data = checkpointer.restore(10, jax.eval_shape(trainer._init), trainer.state_shardings)
checkpointer.save(11, state.replace(step=state.step + 1), data)  # async
checkpointer.wait()  # blocks until killed
"""


def test_sigkill_during_async_save_restores_previous(experiment, run_a, trainer, tmp_path):
    workdir = _copy(run_a, tmp_path, steps=("10",))
    marker = str(tmp_path / "save_in_flight")
    script = KILLED_DURING_SAVE.format(experiment=experiment, workdir=workdir, marker=marker)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not os.path.exists(marker):
        try:
            proc.wait(timeout=0.05)
            pytest.fail(f"the saving process exited early: {proc.stdout.read().decode()[-3000:]}")
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.communicate()
    left = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(name.startswith("11.orbax-checkpoint-tmp") for name in left), left

    checkpointer = Checkpointer(workdir, keep=5)
    assert checkpointer.all_steps() == [10]
    assert checkpointer.step_to_restore() == 10
    state, data = checkpointer.restore(10, jax.eval_shape(trainer._init),
                                       trainer.state_shardings)
    _assert_bitwise_equal(state, _restore(trainer, run_a, 10)[0])
    checkpointer.save(11, state, data)  # the restarted run saves step 11 over the debris
    checkpointer.wait()
    assert checkpointer.all_steps() == [10, 11]
    checkpointer.close()


def _listing(workdir):
    return sorted((os.path.relpath(os.path.join(d, f), workdir),
                   os.path.getsize(os.path.join(d, f)))
                  for d, _, files in os.walk(workdir) for f in files)


def _truncate_arrays(workdir):
    state = os.path.join(workdir, "checkpoints", "20", "state")
    for d, _, files in os.walk(state):
        for f in files:
            if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep:
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(d, f)) // 2)


def _garble_metadata(workdir):
    with open(os.path.join(workdir, "checkpoints", "20", "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": [garbled')


def _delete_frozen(workdir):
    shutil.rmtree(os.path.join(workdir, "frozen"))


def _more_xattn_heads(config):
    config.model.xattn.num_heads = 2


@pytest.mark.parametrize("damage,edit,error", [
    (_truncate_arrays, None, r"checkpoints/20 is corrupt or incomplete"),
    (_garble_metadata, None, r"checkpoints/20 is corrupt or incomplete"),
    (_delete_frozen, None, r"frozen params .*/frozen that the checkpoints refer to are missing"),
    (None, _more_xattn_heads,
     r"does not match the config's parameter tree: trainable.lm/xattn_0/k/kernel: checkpoint shape "
     r"\(128, 4, 32\), model shape \(128, 2, 32\)"),
    (None, lambda c: c.checkpoint.update(restore_step=15),
     r"restore_step=15 but .*/checkpoints has steps \[10, 20\]"),
    (None, lambda c: c.checkpoint.update(restore_step=10),
     r"restore_step=10 but .*/checkpoints also has later steps \[20\]"),
])
def test_bad_checkpoint_fails_clearly_and_deletes_nothing(experiment, run_a, tmp_path, damage,
                                                          edit, error):
    workdir = _copy(run_a, tmp_path)
    if damage:
        damage(workdir)
    config = _config(experiment)
    if edit:
        edit(config)
    before = _listing(workdir)
    with pytest.raises(CheckpointError, match=error):
        train(config, workdir)
    assert _listing(workdir) == before


def test_required_checkpoint_missing(experiment, tmp_path):
    config = _config(experiment)
    config.checkpoint.require = True
    with pytest.raises(CheckpointError, match=r"checkpoint.require=True but .* has no complete"):
        train(config, str(tmp_path / "empty"))
