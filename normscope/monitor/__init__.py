"""Watching normalization during training: :class:`Monitor` and its Parquet run folders."""

from normscope.monitor.monitor import Monitor

__all__ = ["Monitor"]
