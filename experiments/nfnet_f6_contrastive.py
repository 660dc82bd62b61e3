"""Contrastive pretraining of Flamingo's vision encoder (SPEC §3.1; paper appendix B.1.3):
NFNet-F6 at 288 px and a BERT-style text tower, both projected to a 1376-d joint space,
trained with the two-way contrastive loss (label smoothing 0.1) over the global batch on
the ALIGN and LTIP image-text pairs, gradients accumulated over both datasets each step.

Adam with the learning rate decayed linearly to 0; adaptive gradient clipping (λ = 0.01,
unit-wise) on the NFNet with its final projection exempt; global-norm clipping on the text
tower. The trained `vision/...` parameters are the frozen encoder of a Flamingo config
that names this run's workdir in `config.model.vision_init`.

Values that SPEC §3.1 and the paper's text leave open (text tower size, learning rate,
batch, steps, clipping norm) are our choices and marked so.
"""

import ml_collections

from flamingo_jax import base_config


def get_config(arg=None):
    del arg
    config = base_config.get_config()
    model = config.model
    model.kind = "contrastive"
    model.vision.variant = "F6"
    # The text tower reads the same SentencePiece vocabulary as the Flamingo LM: its
    # pretrained pieces (model.lm.vocab_size, which the train CLI checks against the
    # tokenizer) plus the appended <image>/<EOC> ids that pair captions carry.
    model.text = ml_collections.ConfigDict(dict(
        vocab_size=model.lm.get_ref("vocab_size") + model.lm.get_ref("num_extra_tokens"),
        num_layers=12, dim=768, num_heads=12, mlp_dim=3072,  # BERT-base shape (our choice)
        max_length=config.input.get_ref("text_length"), head_dim=None, pad_id=0,
    ))
    model.contrastive = ml_collections.ConfigDict(dict(
        embed_dim=1376,  # joint embedding size (paper)
        init_temperature=0.07,  # CLIP's initial τ; learned as log(1/τ) (our choice)
        max_logit_scale=100.0,  # 1/τ is capped here, as in CLIP (our choice)
        label_smoothing=0.1,  # paper
    ))
    config.input.update(image_size=288, num_media=1, num_frames=1, text_length=64)

    # Logical name of the joint-embedding axis (projection kernels, embeddings).
    config.sharding_rules = (*config.sharding_rules, ("joint", None))

    config.train.trainable = (".*",)  # both towers train; nothing is frozen
    config.train.task_weights = ml_collections.ConfigDict(dict(align=1.0, ltip=1.0))
    config.train.num_steps = 1_200_000  # our choice
    config.train.log_every = 100
    config.data.tasks = ml_collections.ConfigDict({
        name: dict(kind="pairs", source="tfrecord", path=f"data/{name}", batch_size=8192,
                   text_length=64)
        for name in ("align", "ltip")  # 16,384 pairs per step in total (our choice)
    })

    config.optimizer.update(
        lr=1e-3, warmup_steps=5000,  # our choice
        schedule="linear", end_lr_fraction=0.0,  # decayed linearly to 0 (paper)
        weight_decay=0.0, no_weight_decay=(),  # Adam (paper): no decoupled decay
        grad_clip_norm=1.0,  # global-norm clip of the text tower (norm: our choice)
    )
    # Adaptive gradient clipping (optax.adaptive_grad_clip, unit-wise) on the NFNet; its
    # final projection (image_head/projection) is exempt. Global-norm clipping covers
    # only the text tower; the inverse temperature is not clipped.
    config.optimizer.agc_clip = 0.01
    config.optimizer.agc_eps = 1e-3
    config.optimizer.agc_params = (r"^vision/", r"^image_head/final_conv/")
    config.optimizer.grad_clip_params = (r"^text/", r"^text_projection/")
    return config
