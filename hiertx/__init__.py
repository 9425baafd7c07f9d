"""hiertx: hierarchical (multi-scale) transformer language models."""

import os

# TensorFlow (used by seqio for input pipelines only) logs at length on import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Orbax reaches gs:// through etils.epath, which uses TensorFlow's file system
# where TensorFlow is installed and fsspec's gcsfs otherwise: gcsfs is what
# hiertx.storage uses too, and it spares every run a TensorFlow import.
os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
