"""Every error normscope raises on purpose.

Each class is also a built-in exception, so callers' ``except ValueError`` still works
(the pattern of ``sklearn.exceptions``). The CLI catches :class:`NormscopeError` at its
boundary and prints its message as one line.
"""


class NormscopeError(Exception):
    """Base class of all normscope errors."""


class CheckpointError(NormscopeError, ValueError):
    """A checkpoint file is missing, unreadable, truncated, or does not fit the model."""


class UntrustedPickleError(CheckpointError):
    """A checkpoint needs full pickle loading, which runs code, and trust was not given."""


class ModelImportError(NormscopeError, ImportError):
    """A ``package.module:factory`` spec could not be imported or called."""


class NoNormSitesError(NormscopeError, ValueError):
    """The model (or the site selection) has no normalization site."""


class DataShapeError(NormscopeError, ValueError):
    """The data does not fit the model."""


class UnknownNameError(NormscopeError, ValueError):
    """A name (model, op, analyzer, norm kind) is not one of the valid names."""

    def __init__(self, what: str, name: str, valid: "list[str] | tuple[str, ...]") -> None:
        super().__init__(f"unknown {what} {name!r}; valid names: {', '.join(sorted(valid))}")
        self.name = name
        self.valid = sorted(valid)


class NonFiniteError(NormscopeError, FloatingPointError):
    """NaN or Inf where finite numbers are required."""


class AnalyzerError(NormscopeError, RuntimeError):
    """An analyzer could not run: its module is missing, or it failed on this model."""


class OutputError(NormscopeError, OSError):
    """An output folder cannot be written (exists and is not empty, not writable) or read back."""


class InvalidArgumentError(NormscopeError, ValueError):
    """An argument is outside its valid range (the message names the value and the range)."""


class NormscopeWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one line)."""
