"""normscope: diagnostics for the normalization layers of PyTorch models.

The public names are imported on first use, so ``import normscope`` (and the command line's
start-up, where Ctrl-C must stay one line) does not import torch until something needs it.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

__all__ = ["Monitor", "analyze", "capture", "find_sites", "find_unrecognized", "recalibrate", "register_norm"]

_HOMES = {
    "Monitor": "normscope.monitor",
    "analyze": "normscope.api",
    "find_sites": "normscope.capture",
    "find_unrecognized": "normscope.capture",
    "recalibrate": "normscope.recalibration",
    "register_norm": "normscope.registry",
}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'normscope' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``normscope.capture`` is the function, as with an eager ``from ... import capture``, even
    after the import system binds the ``normscope.capture`` subpackage to the same name."""

    @property
    def capture(self):
        return importlib.import_module("normscope.capture").capture

    @capture.setter
    def capture(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
