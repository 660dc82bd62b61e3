"""Defaults shared by every experiment; `experiments/*.py` state only their deltas.

    from flamingo_jax import base_config
    def get_config(arg=None):
        config = base_config.get_config()
        config.model.lm.num_layers = 24
        ...
        return config

Defaults are the paper's Flamingo-3B (SPEC §3.6) with the paper's training recipe.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---- Model (SPEC §3) -------------------------------------------------------------
    config.model = model = ml_collections.ConfigDict()
    # What the trainer builds (flamingo_jax/model_kinds.py): "flamingo", or "lm" for
    # text-only pretraining of the LM (then set train.trainable = (".*",)).
    model.kind = "flamingo"
    model.dtype = "bfloat16"  # compute dtype; the loss is taken in float32
    # Earlier stages' checkpoints read into a fresh state (flamingo_jax/warm_start.py): a
    # workdir, its checkpoints/ directory or one checkpoints/<step> of an "lm"-kind run
    # (fills lm/...; `<image>`/`<EOC>` rows start at the mean embedding), and of a run
    # whose parameters hold the image tower under vision/ (fills vision/...). None: random.
    model.lm_init = ml_collections.FieldReference(None, field_type=str)
    model.vision_init = ml_collections.FieldReference(None, field_type=str)
    # A Flamingo run whose every parameter, trainable and frozen alike, starts this one
    # (e.g. experiments/finetune.py); lm_init / vision_init, when also set, override parts.
    model.init_from = ml_collections.FieldReference(None, field_type=str)
    model.media_attention = "previous"  # or "all_previous" (ablation)

    # Frozen vision encoder: an NFNet variant name (F0–F7, or a tiny one), or None when
    # training from precomputed features. Other keys override the variant's NFNet kwargs.
    model.vision = ml_collections.ConfigDict({"variant": "F6"})

    model.resampler = ml_collections.ConfigDict(
        dict(num_layers=6, dim=1536, num_heads=16, head_dim=128, num_latents=64,
             max_frames=8, ffw_mult=4)
    )

    # Frozen Llama-family LM. The paper's Chinchilla 1.4B: 24 layers, width 2048, 16 heads;
    # the MLP width makes the LM 1.40B parameters with a 32k vocabulary.
    model.lm = ml_collections.ConfigDict(
        dict(vocab_size=32000, num_extra_tokens=2, num_layers=24, dim=2048, num_heads=16,
             num_kv_heads=16, mlp_dim=5888, max_length=256, head_dim=None,
             rope_theta=10000.0, norm_eps=1e-6, qkv_bias=False, tie_embeddings=False,
             remat_policy="none")
    )
    # `<image>` and `<EOC>` are appended after the pretrained vocabulary.
    vocab_size = model.lm.get_ref("vocab_size")
    model.image_token_id = vocab_size + 0
    model.eoc_token_id = vocab_size + 1

    model.xattn = ml_collections.ConfigDict(
        dict(every=1, num_heads=16, head_dim=128, ffw_mult=4, gate="tanh")
    )

    # ---- Input shapes (SPEC §4) -------------------------------------------------------
    config.input = ml_collections.ConfigDict(
        dict(image_size=320, num_media=5, num_frames=1, text_length=256, batch_size=8)
    )

    # ---- Mesh and sharding (SPEC §5) --------------------------------------------------
    # Sizes of ('data', 'fsdp', 'tensor'); -1 fills the remaining devices. num_devices None
    # means every device of the job.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, num_devices=None))
    # Logical axis → mesh axes. Every parameter and activation axis name appears here.
    config.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("media", None),
        ("latents", None),
        ("frames", None),
        ("conv_in", None),
        ("conv_out", "fsdp"),
        ("classes", None),
    )

    # ---- Training (SPEC §5) -----------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    # Regexes over '/'-joined parameter paths; a parameter trains when any matches. The
    # paper trains the resampler, the gated layers and the `<image>`/`<EOC>` rows.
    config.train.trainable = (r"^resampler/", r"^lm/xattn_\d+/", r"/extra_")
    config.train.frozen_param_dtype = "bfloat16"
    config.train.trainable_param_dtype = "float32"
    config.train.optimizer_states_per_param = 2  # AdamW: first and second moments
    config.train.seed = 0
    # λ_m per dataset (paper: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03).
    config.train.task_weights = ml_collections.ConfigDict(
        dict(m3w=1.0, align=0.2, ltip=0.2, vtp=0.03)
    )
    config.train.num_steps = 500_000
    config.train.log_every = 100
    # Consecutive non-finite losses after which the run stops with an error.
    config.train.max_consecutive_skips = 10

    config.train.microbatches = 1  # gradient accumulation steps per dataset batch
    # MFU's denominator per device; None: flamingo_jax.flops's table for TPU/GPU kinds and a
    # matmul probe on CPU (an unknown kind then logs no mfu).
    config.train.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)

    # Async saves every save_every steps, at the end and on SIGTERM; the newest `keep` stay,
    # plus every keep_every-th step (None: none). Start-up restores the latest checkpoint, or
    # restore_step; require=True fails instead of starting fresh when there is none.
    config.checkpoint = ml_collections.ConfigDict(dict(
        save_every=1000, keep=3, keep_every=ml_collections.FieldReference(None, field_type=int),
        restore_step=ml_collections.FieldReference(None, field_type=int), require=False))

    # ---- Input (SPEC §4) ----------------------------------------------------------------
    # Tasks of the seqio mixture: {name: {kind, source, path, batch_size, ...}} with the
    # fields of data_pipelines.tasks.TaskConfig; λ_m comes from train.task_weights.
    # mode: "per_task" (paper: one batch per dataset, Σ_m λ_m·L_m), "round_robin" (one
    # dataset per step in turn) or "sampled" (one batch of examples drawn ∝ λ_m, seqio
    # rates; batch_size examples, None = the sum of the tasks' batch sizes).
    config.data = ml_collections.ConfigDict(
        dict(tokenizer="", mode="per_task", tasks=ml_collections.ConfigDict(),
             batch_size=ml_collections.FieldReference(None, field_type=int))
    )

    config.optimizer = ml_collections.ConfigDict(
        dict(lr=1e-4, warmup_steps=5000, schedule="constant", end_lr_fraction=0.0,
             b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
             no_weight_decay=(r"^resampler/", r"extra_embedding", r"extra_head/"),
             # ((regex over trainable parameter paths, learning-rate factor), ...); the
             # first matching regex wins, unmatched parameters keep factor 1
             lr_multipliers=())
    )

    # ---- Few-shot evaluation (SPEC §7, §8; flamingo_jax/eval.py) ------------------------
    config.eval = ml_collections.ConfigDict()
    config.eval.tokenizer = ""  # SentencePiece model; "" = data.tokenizer
    config.eval.batch_size = 8  # prompts per decoding batch (a multiple of data×fsdp)
    config.eval.length_bucket = 32  # prompts padded to a multiple: fewer shapes to compile
    config.eval.seed = 0  # support draws, query subsets, ensemble orderings
    # flamingo-train runs config.eval.tasks every `every_steps` steps and at the last step
    # (0 = never): WORKDIR/eval/step_<N>.json and TensorBoard scalars eval/<task>/<shots>/..
    config.eval.every_steps = 0
    # One in-context example per kind; the target field ({caption}, {answer},
    # {class_name}) comes last; the query's example is cut right before it.
    config.eval.prompts = ml_collections.ConfigDict(dict(
        captioning="<image>Output: {caption}<EOC>",
        vqa="<image>Question: {question} Answer: {answer}<EOC>",
        classification="<image>Output: {class_name}<EOC>",
        hateful_memes=("<image>is an image with: '{text}' written on it. "
                       "Is it hateful? Answer: {answer}<EOC>"),
        video_captioning="<image>Output: {caption}<EOC>",
        video_qa="<image>Question: {question} Answer: {answer}<EOC>",
    ))
    config.eval.hateful_answers = ("no", "yes")  # HatefulMemes targets for labels 0, 1
    # What a task takes when it does not say (fields of evaluation/fewshot.TaskConfig).
    config.eval.task_defaults = ml_collections.ConfigDict(dict(
        shots=(0, 4, 8, 16, 32), num_queries=0, trials=3, selection="random",
        max_new_tokens=20, beam_size=3, length_penalty=0.0, ensemble=1, num_frames=1,
    ))
    # {name: {kind: captioning | vqa | classification | hateful_memes | video_captioning |
    #  video_qa, format: a layout of evaluation/datasets.py, support: {reader args},
    #  query: {reader args}, and any task_defaults key}}.
    config.eval.tasks = ml_collections.ConfigDict()
    return config
