"""grain_jax: GRAIN (Halbe et al., arXiv 2412.04429) in JAX/Flax."""
import setuptools

CORE = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "ml_collections>=1.1,<2",
    "clu==0.0.12",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8",
    "importlib_resources>=6",  # tfds 4.9.10 imports it on py3.11 without declaring it
    "pillow>=11",
    "tensorboardX>=2.6",
    "ftfy>=6",
    "regex",
    "tqdm",
    "matplotlib>=3.8",
    "numpy>=2",
]
TEST = ["pytest>=8", "pytest-xdist>=3", "scipy>=1.12", "portpicker>=1.6"]
# Checkpoint import (grain-jax-convert): PyTorch stays out of the default install. open_clip and timm
# import torchvision at import time, so it is needed too; the CPU builds are enough (README, Quick start).
CONVERT = ["torch>=2.4", "torchvision", "open_clip_torch>=3.3,<4", "timm>=1.0.31,<2", "safetensors>=0.8"]
# grain-jax-annotate: the MLLM client (httpx) and the OWLv2 checkpoint reader (safetensors); transformers (pinned:
# the parity tests check the Flax OWLv2 against this version) only for the PyTorch detector path and the tests.
ANNOTATE = ["httpx>=0.28,<1", "safetensors>=0.8", "transformers==5.18.0"]
# Viewing the event files the trainer writes (writing them needs only tensorboardX, in the core).
TENSORBOARD = ["tensorboard>=2.16"]
# CLIP_benchmark plug-in; pinned because the launcher patches its top-k accuracy for NumPy >= 2.3.
# (benchmarks/pipeline_throughput.py also uses webdataset and psutil.)
BENCHMARK = ["clip_benchmark==1.6.2", "webdataset>=0.2", "psutil>=5"]
# grain-jax-compile for TPU topologies on machines without TPUs: the TPU compiler that matches jax (jax[tpu]'s pin).
TPU_AOT = ["libtpu==0.0.42.*"]

setuptools.setup(
    name="grain_jax",
    version="0.1.0",
    description="GRAIN: grounding descriptions in images, a JAX/Flax TPU-first implementation",
    packages=setuptools.find_packages(include=["grain_jax", "grain_jax.*"]),
    package_data={"grain_jax.data": ["*.txt.gz"], "grain_jax.annotate": ["prompts/*.json"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"test": TEST, "convert": CONVERT, "benchmark": BENCHMARK, "annotate": ANNOTATE,
                    "tensorboard": TENSORBOARD, "tpu-aot": TPU_AOT},
    entry_points={
        "console_scripts": [
            "grain-jax-train=grain_jax.cli.train:run",
            "grain-jax-compile=grain_jax.cli.compile:run",
            "grain-jax-prepare=grain_jax.cli.prepare:run",
            "grain-jax-eval=grain_jax.cli.eval:run",
            "grain-jax-visualize=grain_jax.cli.visualize:run",
            "grain-jax-convert=grain_jax.cli.convert:run",
            "grain-jax-clip-benchmark=grain_jax.cli.clip_benchmark:run",
            "grain-jax-annotate=grain_jax.cli.annotate:run",
        ]
    },
)
