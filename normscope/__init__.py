"""normscope: diagnostics for the normalization layers of PyTorch models."""

from normscope.capture import capture, find_sites, find_unrecognized
from normscope.registry import register_norm
from normscope.api import analyze
from normscope.monitor import Monitor
from normscope.recalibration import recalibrate

__version__ = "0.1.0"

__all__ = ["Monitor", "analyze", "capture", "find_sites", "find_unrecognized", "recalibrate", "register_norm"]
