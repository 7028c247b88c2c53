"""normscope: diagnostics for the normalization layers of PyTorch models."""

__version__ = "0.1.0"
