"""hiertx: hierarchical (multi-scale) transformer language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="hiertx",
    version="0.1.0",
    description="Multi-scale transformer language models (bottom-up, top-down, "
    "retina, hourglass) with a seqio/Orbax/absl training framework.",
    packages=setuptools.find_packages(include=["hiertx", "hiertx.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml_collections>=1.0,<2",
        "tensorflow>=2.18,<2.22",
        "tensorflow-datasets>=4.9.7,<5",
        "tensorboard>=2.18,<2.22",
        "seqio>=0.0.19,<0.1",
        "absl-py>=2.1,<3",
        "clu>=0.0.12,<0.1",
        "numpy>=1.26,<3",
        "matplotlib>=3.8,<4",
    ],
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"]},
)
