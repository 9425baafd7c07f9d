"""hiertx: hierarchical (multi-scale) transformer language models."""

__version__ = "0.1.0"
