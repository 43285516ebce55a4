"""graft_jax: grafting pretrained diffusion transformers in JAX/Flax."""
from setuptools import find_packages, setup

# torch 2.14.1 with torchvision 0.29.1: the pair the FID Inception parity tests need (torchvision builds the
# reference network); the converter alone works with any torch >= 2.13.
TORCH = ["torch>=2.13,<=2.14.1", "safetensors>=0.4"]

setup(
    name="graft_jax",
    version="0.1.0",
    description="Explore diffusion-transformer designs by grafting pretrained DiTs, in JAX/Flax.",
    packages=find_packages(include=["graft_jax", "graft_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6", "flax>=0.10", "optax>=0.2", "orbax-checkpoint>=0.12", "ml-collections>=0.1",
        "tensorflow-datasets>=4.9", "numpy>=1.26", "clu>=0.0.12", "absl-py", "pillow",
        "scikit-learn>=1.3",  # ships the demo set (8x8 handwritten digits) inside the package
        "matplotlib>=3.7",  # the demo report's loss plots
        "importlib_resources",  # tensorflow-datasets needs it to prepare imagenet2012
    ],
    extras_require={
        "torch": TORCH,
        "test": TORCH + ["torch==2.14.1", "torchvision==0.29.1", "pytorch-fid>=0.3", "torch-fidelity>=0.3",
                         "diffusers==0.42.*", "transformers>=4.40", "sentencepiece>=0.2", "protobuf>=4",
                         "pytest>=8", "pytest-xdist>=3", "scipy>=1.11", "tensorflow-cpu>=2.16",
                         "tensorboard>=2.16"],
    },
)
