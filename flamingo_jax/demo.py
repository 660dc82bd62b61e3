"""`make demo`: Flamingo's whole recipe at toy scale, end to end on a small CPU.

    python -m flamingo_jax.demo --workdir workdirs/demo

Stages, each a banner below, everything under WORKDIR (layout: experiments/demo.data_paths):
  1. data        synthetic shapes: interleaved pages, image-caption pairs, pages in the
                 few-shot prompt formats, text-only documents, held-out copies of each
                 (another seed) and the few-shot evaluation sets
  2. tokenizer   SentencePiece BPE trained on the synthetic corpus
  3. lm          the tiny LM pretrained on text alone (experiments/demo_lm.py), with
                 flamingo-train's own `train` (same trainer, checkpoints, metrics)
  4. vision      the tiny NFNet pretrained contrastively on the image-caption pairs
                 (experiments/demo_contrastive.py), evaluated by held-out image↔text
                 retrieval recall@1/5/10 and zero-shot colour classification
  5. flamingo    experiments/demo.py: the LM (read from stage 3's checkpoint) and the
                 vision encoder (read from stage 4's) frozen; resampler, gated layers and
                 `<image>`/`<EOC>` rows trained on the three image datasets
  6. evaluation  held-out loss per dataset at step 0 and at the end of each stage, the
                 gates' tanh(α), few-shot captioning CIDEr and colour-question accuracy at
                 0 and 4 shots before and after the Flamingo stage
Writes WORKDIR/summary.json and WORKDIR/loss_curves.png, prints the table, and exits
non-zero when a check fails (held-out loss must fall well below its step-0 value, gates
must open, colour questions must be answered from the image). Re-running reuses the data
and resumes the training stages from their checkpoints.
"""

import json
import os
import resource
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from experiments import demo as demo_config
from experiments import demo_lm as demo_lm_config
from flamingo_jax import eval as eval_lib
from flamingo_jax import train as train_lib
from flamingo_jax.evaluation import retrieval
from flamingo_jax.train_step import model_inputs, weighted_cross_entropy
from flamingo_jax.trainer import Trainer

# Dataset sizes (tuned so the whole demo fits 15 minutes on 2 CPU cores with headroom).
NUM_DOCS, NUM_PAIRS, NUM_PROMPTED, NUM_TEXT = 256, 2048, 1024, 4000
NUM_HELDOUT = 64  # documents per held-out dataset
NUM_HELDOUT_PAIRS = 256  # held-out pairs: retrieval candidates (and the pairs' held-out loss)
NUM_COLOUR_IMAGES = 256  # one-shape scenes for zero-shot colour classification
HELDOUT_BATCHES = 4  # batches per dataset in a held-out loss
HELDOUT_SEED = 1
STEP0_QUERIES = 16  # few-shot queries before the Flamingo stage (the final evaluation asks all)
# Checks of `make demo` (issues 4 and 6).
LOSS_DROP = 0.6  # the Flamingo stage's held-out loss must fall below this × its step-0 value
MIN_GATE = 0.01  # some gate's |tanh(α)| must exceed this
MIN_COLOUR_ACCURACY = 0.6  # 4-shot colour questions (eight colours: a text-only guess ≈ 1/8)


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_rss_gib() -> float:
    """Peak resident memory of this process and its finished children (Linux: KiB)."""
    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kib / 2**20


# ---- 1. Data ------------------------------------------------------------------------------


def write_data(paths: dict, image_size: int) -> None:
    from data_pipelines import synthetic, synthetic_eval, synthetic_prompted

    done = os.path.join(paths["data"], ".complete")
    if os.path.exists(done):
        _log("data: reusing " + paths["data"])
        return
    synthetic.write_all(paths["synthetic"], seed=0, image_size=image_size, num_docs=NUM_DOCS,
                        num_pairs=NUM_PAIRS, num_clips=2, num_frames=2, num_eval=2)
    synthetic_prompted.write_prompted_mmc4(paths["prompted"], NUM_PROMPTED, seed=0,
                                           image_size=image_size)
    synthetic_prompted.write_text_documents(os.path.join(paths["text"], "docs.txt"), NUM_TEXT,
                                            seed=0)
    heldout = paths["heldout"]
    synthetic.write_mmc4(os.path.join(heldout, "mmc4"), NUM_HELDOUT, HELDOUT_SEED, image_size)
    synthetic.write_webdataset(os.path.join(heldout, "webdataset"), NUM_HELDOUT_PAIRS,
                               HELDOUT_SEED, image_size)
    synthetic_prompted.write_prompted_mmc4(os.path.join(heldout, "prompted"), NUM_HELDOUT,
                                           HELDOUT_SEED, image_size)
    synthetic_prompted.write_text_documents(os.path.join(heldout, "text", "docs.txt"),
                                            NUM_HELDOUT * 4, HELDOUT_SEED)
    written = synthetic_eval.write_all(paths["fewshot"], seed=0, image_size=image_size,
                                       num_support=demo_config.FEWSHOT_SUPPORT,
                                       num_query=demo_config.FEWSHOT_QUERIES)
    if written != demo_config.fewshot_paths(paths["fewshot"]):
        raise RuntimeError("data_pipelines.synthetic_eval.write_all changed its layout; update "
                           f"experiments/demo.py fewshot_paths to {written}")
    open(done, "w").close()


# ---- 2. Tokenizer -------------------------------------------------------------------------


def train_tokenizer(paths: dict) -> None:
    from data_pipelines import tokenizer, train_tokenizer as trainer_lib

    if not os.path.exists(paths["tokenizer"]):
        trainer_lib.train_sentencepiece([paths["corpus"]], paths["tokenizer"][:-len(".model")],
                                        vocab_size=demo_config.VOCAB_SIZE, model_type="bpe")
    size = tokenizer.load_vocabulary(paths["tokenizer"]).base_vocab_size
    if size != demo_config.VOCAB_SIZE:
        raise RuntimeError(f"the demo tokenizer has {size} pieces, the demo configs expect "
                           f"experiments/demo.py VOCAB_SIZE={demo_config.VOCAB_SIZE}")


# ---- 4. Vision encoder ---------------------------------------------------------------------


def contrastive_config(paths: dict):
    from data_pipelines import tokenizer
    from experiments import demo_contrastive

    config = demo_contrastive.get_config(paths["data"])
    config.model.lm.vocab_size = tokenizer.load_vocabulary(config.data.tokenizer).base_vocab_size
    return config


def colour_classification(config, workdir: str, image_size: int) -> dict[str, float]:
    """Zero-shot colour classification of NUM_COLOUR_IMAGES held-out one-shape scenes by the
    contrastive run in `workdir`: each colour's class embedding is the mean over prompts
    "a {size} {colour} {shape}" of every size and shape."""
    from flax import traverse_util

    from data_pipelines import synthetic_scenes as scenes
    from data_pipelines import tokenizer
    from flamingo_jax.evaluation import media, retrieval
    from flamingo_jax.models.contrastive import build_contrastive, load_params

    colours = list(scenes.COLOURS)
    images, labels = [], []
    for i in range(NUM_COLOUR_IMAGES):
        scene = scenes.random_scene(np.random.default_rng([HELDOUT_SEED, 30, i]), 1)
        images.append(media.preprocess(scenes.render_scene(scene, image_size), image_size))
        labels.append(colours.index(scene.shapes[0].colour))
    model = build_contrastive(config.model)
    params = traverse_util.unflatten_dict(load_params(workdir), sep="/")
    vocab = tokenizer.load_vocabulary(config.data.tokenizer)
    templates = [f"a {size} {{}} {shape}" for size in scenes.SIZES for shape in scenes.SHAPES]
    classes = retrieval.zero_shot_classifier(model, params, vocab, colours, templates,
                                             config.model.text.max_length)
    image_emb, _ = retrieval.embed_pairs(model, params, np.stack(images),
                                         np.zeros((1, config.model.text.max_length), np.int32))
    accuracy = retrieval.zero_shot_accuracy(image_emb, classes, np.array(labels), ks=(1,))
    return {"colour_top1": accuracy["top1"], "colour_chance": 1.0 / len(colours)}


# ---- 6. Evaluation helpers ----------------------------------------------------------------


def heldout_batches(config, task_dicts: dict) -> dict[str, list[dict]]:
    """Up to HELDOUT_BATCHES host batches per held-out task (first windows, no
    augmentation), read once and reused for every evaluation."""
    from data_pipelines import mixture_iterator, tasks, tokenizer

    vocab = tokenizer.load_vocabulary(config.data.tokenizer)
    configs = tasks.configs_from_dict(task_dicts, image_size=config.input.image_size)
    mixture = tasks.register_mixture(f"heldout_{os.getpid()}", configs, vocab)
    iterators = mixture_iterator.make_task_iterators(
        mixture, {n: t["batch_size"] for n, t in task_dicts.items()}, shuffle=False,
        num_epochs=1)
    out = {}
    try:
        for name, iterator in iterators.iterators.items():
            out[name] = [batch for _, batch in zip(range(HELDOUT_BATCHES), iterator)]
    finally:
        iterators.close()
    return out


def heldout_losses(trainer: Trainer, params, batches: dict[str, list[dict]]) -> dict[str, float]:
    """Token-weighted mean cross-entropy per task, as the train step computes it."""

    @jax.jit
    def loss_sums(params, batch):
        inputs = trainer.kind.model_inputs(model_inputs(batch), False)
        logits = trainer.model.apply({"params": params}, **inputs)
        return weighted_cross_entropy(logits, batch["targets"], batch["loss_weights"])

    out = {}
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        for name, task_batches in batches.items():
            sums = [loss_sums(params, {k: v for k, v in b.items() if v.dtype.kind in "biuf"})
                    for b in task_batches]
            total, weight = (sum(float(s[i]) for s in sums) for i in (0, 1))
            out[name] = total / max(weight, 1.0)
    return out


def with_other_images(batch: dict) -> dict:
    """`batch` with each real media slot holding another example's image from that slot (a
    cyclic shift over the examples that have one) and the text unchanged: the held-out loss
    on it minus the true one is how much the model reads the images."""
    media = batch["media"].copy()
    for m in range(media.shape[1]):
        rows = np.flatnonzero(batch["media_mask"][:, m])
        media[rows, m] = batch["media"][np.roll(rows, 1), m]
    return dict(batch, media=media)


def gates(params) -> dict[str, dict[str, float]]:
    """tanh(α) of every gated layer: {xattn_i: {"xattn": ., "dense": .}}."""
    return {name: {"xattn": float(np.tanh(layer["alpha_xattn"])),
                   "dense": float(np.tanh(layer["alpha_dense"]))}
            for name, layer in sorted(params["lm"].items(), key=lambda kv: kv[0])
            if name.startswith("xattn_")}


def fewshot(config, params, step: int, workdir: str) -> dict:
    return eval_lib.evaluate(config, params, step, workdir=workdir, progress=False)


def evaluate_flamingo(config, workdir: str, trainer: Trainer, heldout: dict) -> dict:
    """The trained Flamingo stage in `workdir`: its params, held-out losses with the true
    and with other examples' images, and the few-shot results."""
    _, params, _ = eval_lib.restore_params(config, workdir)
    return {
        "params": params,
        "heldout": heldout_losses(trainer, params, heldout),
        "other_images": heldout_losses(
            trainer, params, {k: [with_other_images(b) for b in v] for k, v in heldout.items()}),
        "fewshot": fewshot(config, params, config.train.num_steps, workdir),
    }


# ---- 7. Report ----------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def plot_losses(stages: dict[str, list[dict]], path: str) -> None:
    """One panel per stage: training loss per dataset against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, (stage, records) in zip(axes[0], stages.items()):
        names = sorted({k for r in records for k in r if k.startswith("loss/")})
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            ax.plot(*zip(*points), label=name.removeprefix("loss/"))
        ax.set(title=f"{stage} stage", xlabel="step", ylabel="training loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(summary: dict) -> str:
    lines = ["", "held-out loss (nats/token)          step 0       end"
             "   end, other examples' images"]
    for stage, losses in summary["heldout_loss"].items():
        for task, (start, end) in losses.items():
            other = summary["heldout_loss_other_images"].get(stage, {}).get(task)
            lines.append(f"  {stage + ' / ' + task:<32}{start:>8.3f}{end:>10.3f}"
                         + (f"{other:>10.3f} ({other - end:+.3f})" if other is not None else ""))
    vision = summary["vision"]
    lines.append(f"vision stage: held-out retrieval over {vision['num_pairs']:.0f} pairs "
                 f"(chance R@1 {vision['chance_recall_at_1']:.3f})     R@1     R@5    R@10")
    for direction in ("image_to_text", "text_to_image"):
        lines.append(f"  {direction:<32}" + "".join(
            f"{vision[f'{direction}/recall@{k}']:>8.3f}" for k in retrieval.RECALL_KS))
    lines.append(f"  zero-shot colour top-1 {vision['colour_top1']:.3f} "
                 f"(chance {vision['colour_chance']:.3f})")
    lines.append("gates tanh(α) at the end            xattn     dense")
    for layer, values in summary["gates"].items():
        lines.append(f"  {layer:<32}{values['xattn']:>8.4f}{values['dense']:>10.4f}")
    for when, results in summary["fewshot"].items():
        lines.append(f"few-shot, Flamingo stage {when}")
        lines.extend("  " + line for line in eval_lib.format_table(results).splitlines())
    lines.append("checks")
    lines.extend(f"  {'PASS' if ok else 'FAIL'}  {what}" for what, ok in summary["checks"].items())
    lines.append(f"wall {summary['wall_seconds']:.0f} s, peak RSS "
                 f"{summary['peak_rss_gib']:.2f} GiB; "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items()))
    return "\n".join(lines)


def demo(workdir: str, random_vision_baseline: bool = False) -> dict:
    start = time.time()
    seconds: dict[str, float] = {}

    def mark(stage: str, since: float) -> float:
        seconds[stage] = time.time() - since
        _log(f"{stage}: {seconds[stage]:.0f} s")
        return time.time()

    os.makedirs(workdir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    paths = demo_config.data_paths(workdir)
    lm_config = demo_lm_config.get_config(workdir)
    config = demo_config.get_config(workdir)
    t = time.time()
    write_data(paths, config.input.image_size)
    t = mark("data", t)
    train_tokenizer(paths)
    t = mark("tokenizer", t)

    # ---- 3. LM: text-only pretraining ---------------------------------------------------
    lm_heldout = heldout_batches(lm_config, demo_lm_config.text_tasks(paths, heldout=True))
    lm_trainer = Trainer(lm_config)
    lm_start = heldout_losses(lm_trainer, lm_trainer.init_state().params(), lm_heldout)
    train_lib.train(lm_config, paths["lm_workdir"])
    _, lm_params, _ = eval_lib.restore_params(lm_config, paths["lm_workdir"])
    lm_end = heldout_losses(lm_trainer, lm_params, lm_heldout)
    del lm_trainer, lm_params
    t = mark("lm", t)

    # ---- 4. Vision encoder: contrastive pretraining -----------------------------------------
    # experiments/demo.py names paths["vision_workdir"] in config.model.vision_init.
    vision_config = contrastive_config(paths)
    train_lib.train(vision_config, paths["vision_workdir"])
    vision = retrieval.evaluate_checkpoint(vision_config, paths["vision_workdir"],
                                           os.path.join(paths["heldout"], "webdataset"))
    vision.update(colour_classification(vision_config, paths["vision_workdir"],
                                        config.input.image_size))
    t = mark("vision", t)

    # ---- 5. Flamingo stage ----------------------------------------------------------------
    heldout = heldout_batches(config, demo_config.flamingo_tasks(paths, heldout=True))
    trainer = Trainer(config)
    params = trainer.init_state().params()  # the pretrained LM, gates at 0
    flamingo_start = heldout_losses(trainer, params, heldout)
    step0_config = config.copy_and_resolve_references()
    step0_config.eval.tasks = demo_config.fewshot_tasks(paths, num_queries=STEP0_QUERIES)
    fewshot_start = fewshot(step0_config, params, 0, paths["flamingo_workdir"])
    del params
    t = mark("flamingo step-0 evaluation", t)
    train_lib.train(config, paths["flamingo_workdir"])
    t = mark("flamingo", t)

    # ---- 6. Evaluation --------------------------------------------------------------------
    end = evaluate_flamingo(config, paths["flamingo_workdir"], trainer, heldout)
    params = end["params"]
    t = mark("evaluation", t)
    baseline = None
    if random_vision_baseline:  # issue 8: the same stage on a random frozen NFNet
        random_config = config.copy_and_resolve_references()
        random_config.model.vision_init = None
        train_lib.train(random_config, paths["flamingo_random_vision_workdir"])
        baseline = evaluate_flamingo(random_config, paths["flamingo_random_vision_workdir"],
                                     trainer, heldout)
        t = mark("random-vision baseline", t)

    # ---- 7. Report ------------------------------------------------------------------------
    plot_losses({"lm": read_metrics(paths["lm_workdir"]),
                 "flamingo": read_metrics(paths["flamingo_workdir"])},
                os.path.join(workdir, "loss_curves.png"))
    final_gates = gates(jax.device_get(params))
    flamingo_end, fewshot_end = end["heldout"], end["fewshot"]
    colour = fewshot_end["synthetic_colour_vqa"]["4"]["vqa_accuracy"]
    checks = {
        f"Flamingo held-out loss falls below {LOSS_DROP} x its step-0 value on every dataset":
            all(flamingo_end[k] < LOSS_DROP * flamingo_start[k] for k in flamingo_start),
        f"some gate has |tanh(alpha)| > {MIN_GATE}":
            max(abs(v) for g in final_gates.values() for v in g.values()) > MIN_GATE,
        f"4-shot colour-question accuracy {colour:.3f} >= {MIN_COLOUR_ACCURACY}":
            colour >= MIN_COLOUR_ACCURACY,
    }
    if baseline is not None:
        random_colour = baseline["fewshot"]["synthetic_colour_vqa"]["4"]["vqa_accuracy"]
        checks[f"on the contrastive NFNet at least as good as on a random one: 4-shot colour "
               f"{colour:.3f} vs {random_colour:.3f}, held-out loss on every dataset"] = (
            colour >= random_colour
            and all(flamingo_end[k] <= baseline["heldout"][k] for k in flamingo_end))
    summary = {
        "heldout_loss": {
            "lm": {k: (lm_start[k], lm_end[k]) for k in lm_start},
            "flamingo": {k: (flamingo_start[k], flamingo_end[k]) for k in flamingo_start},
        },
        "heldout_loss_other_images": {"flamingo": end["other_images"]},
        "gates": final_gates,
        "vision": vision,
        "fewshot": {f"step 0 ({STEP0_QUERIES} queries)": fewshot_start,
                    f"at the end ({demo_config.FEWSHOT_QUERIES} queries)": fewshot_end},
        "checks": checks,
        "stage_seconds": seconds,
        "wall_seconds": time.time() - start,
        "peak_rss_gib": peak_rss_gib(),
    }
    if baseline is not None:
        summary["heldout_loss"]["flamingo, random NFNet"] = {
            k: (flamingo_start[k], baseline["heldout"][k]) for k in flamingo_start}
        summary["heldout_loss_other_images"]["flamingo, random NFNet"] = baseline["other_images"]
        summary["fewshot"]["random NFNet, at the end"] = baseline["fewshot"]
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_table(summary), flush=True)
    return summary


def main(argv) -> None:
    del argv
    summary = demo(_WORKDIR.value, _RANDOM_VISION_BASELINE.value)
    if not all(summary["checks"].values()):
        sys.exit("make demo: a check failed (see the table above)")


if __name__ == "__main__":
    _WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where the demo writes outputs.")
    _RANDOM_VISION_BASELINE = flags.DEFINE_bool(
        "random_vision_baseline", False,
        "Also train the Flamingo stage on a random frozen NFNet (WORKDIR/flamingo_random_vision, "
        "about as long again as the Flamingo stage) and check that the contrastive NFNet does "
        "at least as well.")
    app.run(main)
