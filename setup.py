"""rtkern: a runtime for language models with refusal tokens (see README.md)."""
from setuptools import setup

setup(
    name="rtkern",
    version="0.1.0",
    description="Runtime, fused Triton sampler and trainer for LLMs with refusal tokens",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels, trainer and benchmarks live in top-level folders but install under rtkern.*:
    # a top-level package named `kernels` would be picked up by transformers' hub-kernels probe.
    packages=["rtkern", "rtkern.adapters", "rtkern.kernels", "rtkern.train", "rtkern.bench"],
    package_dir={
        "rtkern": "rtkern",
        "rtkern.adapters": "rtkern/adapters",
        "rtkern.kernels": "kernels",
        "rtkern.train": "train",
        "rtkern.bench": "bench",
    },
    install_requires=[
        "torch>=2.11,<3",       # the GPU image's torch 2.11 and CI's newest
        "triton>=3.6,<4",       # kernels compile-checked on Triton 3.6 and 3.9 (tests/gpu_compile.py)
        "transformers>=4.45,<6",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "gguf>=0.10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3.2"]},
    entry_points={"console_scripts": ["rtkern=rtkern.cli:main"]},
)
