"""One job, several processes (issue 7): two local processes of 4 CPU devices each (a
global mesh of 8) train like one process of 8 devices, each reads its own shard of the
data, only process 0 logs, and checkpoints move between the two layouts both ways.

The data makes the two layouts see the same examples in every step: one file, read in
order with no augmentation, so two processes take alternate records and together hold the
records one process takes (in another order, which a mean loss does not see).
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import seqio

from data_pipelines import mixture_iterator, synthetic, tasks, tokenizer, train_tokenizer
from flamingo_jax import distributed
from flamingo_jax.train import train

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 5
SAVE_AT = 3
BATCH = 8
PROCESS_TIMEOUT_S = 900  # generous: this machine is shared; an idle one needs about 60 s

CONFIG = """
from data_pipelines import tokenizer
from experiments import demo


def get_config(arg=None):
    config = demo.get_config()
    config.model.lm.update(vocab_size=tokenizer.load_vocabulary({spm!r}).base_vocab_size,
                           num_layers=1, dim=64, num_heads=2, num_kv_heads=2, mlp_dim=128,
                           max_length=16)
    config.model.resampler.update(num_layers=1, dim=64, num_heads=2, head_dim=32,
                                  num_latents=4)
    config.model.xattn.update(num_heads=2, head_dim=32)
    config.input.update(image_size=32, num_media=1, text_length=16)
    config.data.tokenizer = {spm!r}
    config.data.tasks = {{
        "pairs": dict(kind="pairs", source="webdataset", path={pairs!r}, batch_size={batch},
                      text_length=16, image_size=32, train=False, shuffle_buffer_size=1),
    }}
    config.train.task_weights = {{"pairs": 1.0}}
    config.train.update(num_steps={steps}, log_every=1)
    config.optimizer.update(lr=1e-3, warmup_steps=2)
    config.checkpoint.save_every = {save_at}
    return config
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multihost"))
    paths = synthetic.write_all(root, seed=0, image_size=32, num_docs=2, num_pairs=64,
                                num_clips=1, num_frames=1, num_eval=1, num_shards=1)
    spm = train_tokenizer.train_sentencepiece([paths["corpus"]], os.path.join(root, "spm"),
                                              vocab_size=300)
    path = os.path.join(root, "tiny_config.py")
    with open(path, "w") as f:
        f.write(CONFIG.format(spm=spm, pairs=paths["webdataset"], batch=BATCH,
                              steps=NUM_STEPS, save_at=SAVE_AT))
    return path


def _load_config(path):
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(config_path: str, workdir: str) -> list[str]:
    """flamingo-train as processes 0 and 1 of one job on 127.0.0.1; their console logs."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(4),
           # The test session's compilation cache: a second two-process run compiles nothing.
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    os.makedirs(workdir, exist_ok=True)
    logs = [os.path.join(workdir, f"process_{i}.log") for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "flamingo_jax.train", "--config", config_path,
                 "--workdir", workdir, "--coordinator_address", f"127.0.0.1:{port}",
                 "--num_processes", "2", "--process_id", str(i)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            try:
                procs[0].wait(timeout=0.5)
                procs[1].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    texts = [open(log).read() for log in logs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{texts[i][-3000:]}"
    return texts


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _input_states(workdir: str, step: int) -> dict:
    """The input positions a checkpoint holds (distributed.gather_input_states)."""
    directory = os.path.join(workdir, "checkpoints", str(step), "data")
    (name,) = [n for n in os.listdir(directory) if n not in ("commit_success.txt",)]
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def _resume_copy(workdir: str, step: int, target: str) -> str:
    """A copy of `workdir` as it was after `step`: later checkpoints and the logs left out."""
    later = {str(s) for s in range(step + 1, NUM_STEPS + 1)}
    shutil.copytree(workdir, target, ignore=lambda directory, names: [
        n for n in names if n == "metrics.jsonl" or n.startswith("process_")
        or (os.path.basename(directory) == "checkpoints" and n in later)])
    return target


@pytest.fixture(scope="module")
def runs(config_path, tmp_path_factory):
    """The same training as one process of 8 devices and as two processes of 4."""
    root = tmp_path_factory.mktemp("runs")
    one, two = str(root / "one_process"), str(root / "two_processes")
    train(_load_config(config_path), one)
    logs = _train_two_processes(config_path, two)
    return {"one": one, "two": two, "logs": logs, "root": root}


def test_two_processes_train_like_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               rtol=1e-5)
    # Only process 0 logs: one metrics record per step (above) and one console line.
    console = [re.findall(r"^\[[#-]*\] (\d+)/\d+ ", log, re.M) for log in runs["logs"]]
    assert console == [[str(s) for s in range(1, NUM_STEPS + 1)], []]


def _keys_read(config, shard: list[int], count: int) -> list[bytes]:
    """The first `count` example keys of the input `shard` = [index, num_shards]."""
    vocab = tokenizer.load_vocabulary(config.data.tokenizer)
    configs = tasks.configs_from_dict(config.data.tasks.to_dict(),
                                      image_size=config.input.image_size)
    mixture = tasks.register_mixture(f"multihost_replay_{shard[0]}", configs, vocab)
    batches = mixture_iterator.make_task_iterators(
        mixture, {"pairs": BATCH}, seed=config.train.seed,
        shard_info=seqio.ShardInfo(*shard), with_keys=True)
    keys: list[bytes] = []
    while len(keys) < count:
        keys += list(next(batches)["pairs"]["key"])
    batches.close()
    return keys[:count]


def test_each_process_reads_its_own_shard(runs, config_path):
    config = _load_config(config_path)
    saved = _input_states(runs["two"], SAVE_AT)
    assert saved["num_processes"] == 2
    states = [p["tasks"]["pairs"] for p in saved["processes"]]
    assert [s["shard"] for s in states] == [[0, 2], [1, 2]]
    assert [s["next_index"] for s in states] == [SAVE_AT * BATCH // 2] * 2
    read = [_keys_read(config, s["shard"], s["next_index"]) for s in states]
    assert not set(read[0]) & set(read[1])
    # Together they read what the single process read.
    (single,) = _input_states(runs["one"], SAVE_AT)["processes"]
    alone = _keys_read(config, single["tasks"]["pairs"]["shard"],
                       single["tasks"]["pairs"]["next_index"])
    assert sorted(read[0] + read[1]) == sorted(alone)
    assert len(alone) == SAVE_AT * BATCH


def test_two_process_checkpoint_resumes_in_one_process(runs, config_path):
    workdir = _resume_copy(runs["two"], SAVE_AT, str(runs["root"] / "two_then_one"))
    train(_load_config(config_path), workdir)
    resumed, reference = _losses(workdir), _losses(runs["one"])
    assert sorted(resumed) == list(range(SAVE_AT + 1, NUM_STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                               [reference[s] for s in sorted(resumed)], rtol=1e-5)


def test_one_process_checkpoint_resumes_in_two_processes(runs, config_path):
    workdir = _resume_copy(runs["one"], SAVE_AT, str(runs["root"] / "one_then_two"))
    _train_two_processes(config_path, workdir)
    resumed, reference = _losses(workdir), _losses(runs["one"])
    assert sorted(resumed) == list(range(SAVE_AT + 1, NUM_STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                               [reference[s] for s in sorted(resumed)], rtol=1e-5)


# ---- How a process finds the job (no processes started) --------------------------------

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
         "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu-[03-10,12]-ib,login2",
         "SLURM_JOB_NODELIST": "gpu-[01-12]-ib,login2"}


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("a7,b", "a7"), ("n[01,05-07]", "n01"), ("n-[9-12]-ib,x", "n-9-ib"),
    ("x[1-2]y[3-4],z", "x1y3"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_detect_slurm():
    one_per_node = distributed.detect(env={**SLURM, "SLURM_STEP_TASKS_PER_NODE": "1(x16)"})
    assert one_per_node == distributed.Cluster("slurm", f"gpu-03-ib:{20000 + 4242}", 16, 5)
    one_per_gpu = distributed.detect(env={**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
                                          "FLAMINGO_COORDINATOR_PORT": "12345"})
    assert one_per_gpu == distributed.Cluster("slurm", "gpu-03-ib:12345", 16, 5, (1,))
    assert distributed.detect(env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).kind \
        == "single"


def test_detect_precedence_and_errors():
    env = {**SLURM, "FLAMINGO_COORDINATOR": "10.0.0.2:9000", "FLAMINGO_NUM_PROCESSES": "4",
           "FLAMINGO_PROCESS_ID": "3"}
    assert distributed.detect(env=env) == distributed.Cluster("explicit", "10.0.0.2:9000", 4, 3)
    flags = distributed.detect("127.0.0.1:7000", 2, 1, env=env)
    assert flags == distributed.Cluster("explicit", "127.0.0.1:7000", 2, 1)
    assert flags.loopback and not distributed.detect(env=env).loopback
    assert distributed.detect(env={}, exists=lambda path: False).kind == "single"
    assert distributed.detect(env={"TPU_WORKER_ID": "0"}).kind == "tpu"
    with pytest.raises(ValueError, match="process_id"):
        distributed.detect("127.0.0.1:7000", 2, None, env={})
    with pytest.raises(ValueError, match="0 <= process_id < num_processes"):
        distributed.detect("127.0.0.1:7000", 2, 2, env={})
    with pytest.raises(ValueError, match="HOST:PORT"):
        distributed.detect("127.0.0.1", 2, 0, env={})


def _task_state(shard, next_index, bad):
    return {"name": "pairs", "split": "train", "seed": 0, "shuffle": True, "num_epochs": None,
            "shard": shard, "next_index": next_index, "bad_input": {"no_media": bad}}


def test_input_positions_carry_over_to_another_process_count():
    two = {"num_processes": 2, "processes": [
        {"mode": "per_task", "tasks": {"pairs": _task_state([i, 2], 12, i + 1)}}
        for i in range(2)]}
    assert distributed.input_state_for_process(two, 1, 2) == two["processes"][1]
    assert distributed.input_state_for_process(two, 0, 1) == {
        "mode": "per_task", "tasks": {"pairs": _task_state([0, 1], 24, 3)}}
    # Four processes: each skips a quarter; the bad-input counts stay whole, on process 0.
    four = [distributed.input_state_for_process(two, i, 4)["tasks"]["pairs"] for i in range(4)]
    assert [(s["shard"], s["next_index"]) for s in four] == [([i, 4], 6) for i in range(4)]
    assert [s["bad_input"] for s in four] == [{"no_media": 3}, {}, {}, {}]
    sampled = {"num_processes": 2, "processes": [
        {"mode": "sample", "shard": [i, 2], "choices_made": 10 + i, "next_index": [4, 6 + i],
         "bad_input": {}} for i in range(2)]}
    assert distributed.input_state_for_process(sampled, 0, 1) == {
        "mode": "sample", "shard": [0, 1], "choices_made": 21, "next_index": [8, 13],
        "bad_input": {}}
