"""Installs tulu3, its kernels and checkpoint tools (``pip install -e .[test]``)."""

from setuptools import find_packages, setup

# The tested version, on every Python: the CPU compat patches (tulu3/patches) and the measured
# facts of DESIGN.md are for 0.16.1; >= 0.17 (Python >= 3.12 only) has not been run here.
MEGATRON = "megatron-core==0.16.1"

setup(
    name="tulu3",
    version="0.1.0",
    description="Tülu 3 post-training (SFT, DPO, RLVR) for Llama 3.1 on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["tulu3*", "kernels*", "checkpoints_tools*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        MEGATRON,
        "numpy",
        "tiktoken",
        "regex",  # tulu3.data.tokenizer: Llama 3 pre-tokenizer for BPE training (a tiktoken dep)
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron's dist_checkpointing writer hangs without it (DESIGN.md)
        "matplotlib",
        "sympy",
        "antlr4-python3-runtime==4.11",  # sympy.parsing.latex backend
        "langdetect",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-timeout",
            "transformers",
            "triton",
            "pyarrow",
            "datasets",  # saved HF datasets and the hub-cache reader are tested, not skipped
            "ruff",
        ],
        "gpu": ["transformer-engine[pytorch]", "triton"],
        "data": ["datasets", "pyarrow"],
        "logging": ["tensorboard", "wandb"],
    },
)
