"""beit-fast: custom-kernel BEiT masked-image-modeling pretraining."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
version = {}
for line in (HERE / "beit_fast" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        version["v"] = line.split("=")[1].strip().strip('"')

setup(
    name="beit-fast",
    version=version["v"],
    description="A performance-first engine for BEiT masked-image-modeling pretraining (Triton kernels, DeepSpeed)",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ and train/ live at the top of the repo but install inside beit_fast: a top-level
    # package called `kernels` would clash with other distributions.
    packages=["beit_fast", "beit_fast.kernels", "beit_fast.train"],
    package_dir={"beit_fast": "beit_fast", "beit_fast.kernels": "kernels", "beit_fast.train": "train"},
    # torch is not pinned here on purpose: a bare `torch` requirement would make pip download a
    # multi-GB CUDA build on machines that already have one (see the Makefile).
    install_requires=["torch>=2.4", "numpy", "pillow", "pyyaml", "tqdm", "timm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "timm", "transformers", "dall-e", "safetensors", "matplotlib",
                 "tensorboard", "scipy", "webdataset"],
        "shards": ["webdataset"],  # --data given as WebDataset tar shards (beit_fast.shards)
        "xformers": ["xformers"],
        # DeepSpeed builds from an sdist that imports torch: install it with --no-build-isolation (the Makefile
        # does), or pip builds it against a freshly downloaded torch. 0.19.8: unmanaged gradient accumulation.
        "deepspeed": ["deepspeed>=0.19.8"],
        "plot": ["matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["beit-fast = beit_fast.cli:main"]},
)
