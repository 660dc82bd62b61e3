"""The demo's first stage: contrastive pretraining of the tiny NFNet of experiments/demo.py
on synthetic image-caption pairs (CPU, a few minutes).

    flamingo-train --config experiments/demo_contrastive.py:DATA_DIR --workdir W

DATA_DIR is where `data_pipelines.synthetic.write_all` wrote the synthetic data (pairs
under DATA_DIR/webdataset) and the SentencePiece model DATA_DIR/spm.model lives; set
model.lm.vocab_size to that tokenizer's base vocabulary size. The image tower is
experiments/demo.py's vision encoder (the 'tiny' NFNet at 64 px), so a demo Flamingo with
`config.model.vision_init = W` starts from it.
"""

import os

from experiments import nfnet_f6_contrastive


def get_config(arg=None):
    data_dir = arg or "workdirs/demo/data"
    config = nfnet_f6_contrastive.get_config()
    config.model.dtype = "float32"
    config.model.vision.variant = "tiny"  # = experiments/demo.py
    config.model.lm.vocab_size = 1000  # the demo tokenizer's base vocabulary
    config.model.text.update(num_layers=2, dim=64, num_heads=4, mlp_dim=256)
    config.model.contrastive.embed_dim = 64
    config.input.update(image_size=64, text_length=32)

    config.train.task_weights = {"pairs": 1.0}
    config.train.update(num_steps=200, log_every=25)
    config.data.tokenizer = os.path.join(data_dir, "spm.model")
    # Captions name positions (left/right), so no random flips.
    config.data.tasks = {"pairs": dict(
        kind="pairs", source="webdataset", path=os.path.join(data_dir, "webdataset"),
        batch_size=32, text_length=32, random_flip=False)}
    config.optimizer.update(lr=2e-3, warmup_steps=20)
    config.checkpoint.update(save_every=200, keep=1)
    return config
