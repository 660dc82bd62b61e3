"""Tiny Flamingo behind `make demo`: synthetic data, CPU, a few minutes.

A 4-layer width-128 LM, a tiny NFNet at 64 px, a 2-layer resampler with 16 latents, gated
xattn before every block.

    get_config()           the model alone, over a 1000-token vocabulary (tests and
                           benchmarks add their own data)
    get_config(WORKDIR)    the Flamingo stage of `make demo` (flamingo_jax/demo.py) in
                           WORKDIR: the demo tokenizer's 384-piece vocabulary, data under
                           WORKDIR/data (see `data_paths`), the frozen LM from the
                           text-only stage WORKDIR/lm (experiments/demo_lm.py) and the
                           frozen NFNet from the contrastive stage WORKDIR/vision
                           (experiments/demo_contrastive.py)

    flamingo-train --config experiments/demo.py:workdirs/demo --workdir workdirs/demo/flamingo

The Flamingo stage trains on three synthetic datasets: interleaved pages (M3W-like),
image-caption pairs (ALIGN-like), and interleaved pages in the few-shot prompt formats
(captions after "Output:", questions after "Question:", mostly about colours), so that
few-shot captioning and colour questions can be asked of it. The prompted pages weigh most
and fill the largest batch; the trainable parts (resampler, gated layers, `<image>`/`<EOC>`
rows) train at a high learning rate for few steps, which a CPU run can afford.
"""

import os

from flamingo_jax import base_config

VOCAB_SIZE = 384  # SentencePiece BPE pieces the demo tokenizer is trained to
FEWSHOT_SUPPORT, FEWSHOT_QUERIES = 64, 64  # evaluation set sizes (support, query)


def data_paths(workdir: str) -> dict[str, str]:
    """Where `make demo` writes and the demo configs read everything under `workdir`."""
    data = os.path.join(workdir, "data")
    return {
        "data": data,
        "synthetic": data,  # data_pipelines.synthetic.write_all: mmc4/, webdataset/, ...
        "corpus": os.path.join(data, "corpus.txt"),
        "tokenizer": os.path.join(data, "spm.model"),
        "prompted": os.path.join(data, "prompted"),
        "text": os.path.join(data, "text"),
        "heldout": os.path.join(data, "heldout"),  # the same kinds, another seed
        "fewshot": os.path.join(data, "fewshot"),  # data_pipelines.synthetic_eval.write_all
        "lm_workdir": os.path.join(workdir, "lm"),
        "vision_workdir": os.path.join(workdir, "vision"),
        "flamingo_workdir": os.path.join(workdir, "flamingo"),
        # `python -m flamingo_jax.demo --random_vision_baseline`: the Flamingo stage again on
        # a random frozen NFNet
        "flamingo_random_vision_workdir": os.path.join(workdir, "flamingo_random_vision"),
    }


def fewshot_paths(root: str) -> dict:
    """The paths data_pipelines.synthetic_eval.write_all(root) returns (the demo checks
    that they agree when it writes the sets)."""
    vqa, captions = os.path.join(root, "vqa"), os.path.join(root, "captions")
    classes = os.path.join(root, "classification")

    def vqa_split(subtype):
        return {"questions": os.path.join(vqa, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                "annotations": os.path.join(vqa, f"v2_mscoco_{subtype}_annotations.json"),
                "images_dir": os.path.join(vqa, "images", subtype)}

    return {
        "captions": {"path": os.path.join(captions, "dataset_synthetic.json"),
                     "images_dir": os.path.join(captions, "images")},
        "vqa": {"train": vqa_split("train2014"), "val": vqa_split("val2014")},
        "classification": {"train": os.path.join(classes, "train"),
                           "val": os.path.join(classes, "val"),
                           "class_names": os.path.join(classes, "class_names.txt")},
    }


def fewshot_tasks(paths: dict[str, str], num_queries: int = FEWSHOT_QUERIES) -> dict[str, dict]:
    """`config.eval.tasks`: captioning and colour questions at 0 and 4 shots, one random
    support draw, greedy decoding, the first `num_queries` queries."""
    from data_pipelines import synthetic_eval

    tasks = synthetic_eval.task_configs(fewshot_paths(paths["fewshot"]), shots=(0, 4),
                                        trials=1, num_queries=num_queries, beam_size=1)
    tasks["synthetic_captions"]["max_new_tokens"] = 40
    tasks["synthetic_colour_vqa"]["max_new_tokens"] = 4
    return {k: tasks[k] for k in ("synthetic_captions", "synthetic_colour_vqa")}


def flamingo_tasks(paths: dict[str, str], heldout: bool = False) -> dict[str, dict]:
    """The Flamingo stage's `config.data.tasks`; `heldout` reads the held-out copies in
    evaluation mode (first window, no augmentation). Captions and answers name positions
    (left/right), so images are never flipped."""
    root = paths["heldout"] if heldout else paths["data"]
    prompted = os.path.join(root, "prompted") if heldout else paths["prompted"]
    common = dict(random_flip=False, train=not heldout)
    return {
        # The synthetic pages always describe an image after it, so text never belongs to
        # the next image (p_next 0; the paper's 0.5 suits web pages).
        "m3w": dict(kind="interleaved", source="mmc4", path=os.path.join(root, "mmc4"),
                    batch_size=4, text_length=64, max_media=3, p_next=0.0, **common),
        "pairs": dict(kind="pairs", source="webdataset", path=os.path.join(root, "webdataset"),
                      batch_size=8, text_length=32, **common),
        "prompted": dict(kind="interleaved", source="mmc4", path=prompted, batch_size=8,
                         text_length=96, max_media=5, p_next=0.0, **common),
    }


def get_config(arg=None):
    config = base_config.get_config()
    config.model.dtype = "float32"
    config.model.vision.variant = "tiny"
    config.model.resampler.update(num_layers=2, dim=128, num_heads=4, head_dim=32,
                                  num_latents=16, max_frames=8)
    config.model.lm.update(vocab_size=1000, num_layers=4, dim=128, num_heads=4, num_kv_heads=2,
                           mlp_dim=384, max_length=64)
    config.model.xattn.update(every=1, num_heads=4, head_dim=32)
    config.input.update(image_size=64, num_media=3, num_frames=1, text_length=64, batch_size=8)
    config.train.frozen_param_dtype = "float32"
    if arg is None:
        return config

    # ---- The Flamingo stage of `make demo` in workdir `arg` ------------------------------
    paths = data_paths(arg)
    # max_length covers 4-shot captioning prompts plus the generated caption.
    config.model.lm.update(vocab_size=VOCAB_SIZE, max_length=192)
    config.input.update(num_media=5, text_length=96)
    config.model.lm_init = paths["lm_workdir"]
    config.model.vision_init = paths["vision_workdir"]
    config.data.tokenizer = paths["tokenizer"]
    config.data.tasks = flamingo_tasks(paths)
    config.train.task_weights = {"m3w": 0.5, "pairs": 0.5, "prompted": 1.0}
    config.train.update(num_steps=400, log_every=10)
    # At α = 0 the gated layers' weights get no gradient, and with tiny α Adam moves the
    # resampler as fast as anything while the images' only effect on the loss is noise; the
    # resampler then flattens its output across images before the gates open. Faster gates
    # and a slower resampler let the images through in a few hundred steps (measured:
    # held-out loss with shuffled images 0.09-0.10 nats/token above the true images after
    # 300 steps, against < 0.005 for 150 steps of the plain rate).
    config.optimizer.update(lr=3e-3, warmup_steps=10,
                            lr_multipliers=((r"/alpha_", 10.0), (r"^resampler/", 0.1)))
    config.checkpoint.update(save_every=400, keep=1)
    config.eval.tasks = fewshot_tasks(paths)
    return config
