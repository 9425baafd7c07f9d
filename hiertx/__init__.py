"""hiertx: hierarchical (multi-scale) transformer language models."""

import os

# TensorFlow (used by seqio for input pipelines only) logs at length on import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
