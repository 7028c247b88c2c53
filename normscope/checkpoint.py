"""Load a model to analyze from a checkpoint file and a model spec, safely.

Accepted, in order of preference:

* a state dict (``torch.save(model.state_dict())`` or a ``.safetensors`` file) plus ``--model``,
  a built-in name from :mod:`normscope.models` or ``package.module:factory`` for the user's own;
* a dict as training scripts save it, with the weights under ``state_dict``, ``model`` or
  ``model_state_dict`` (``module.`` / ``_orig_mod.`` prefixes of DataParallel and
  ``torch.compile`` are removed, in any order, when that makes the keys fit the model);
* a whole pickled module, only with ``trust=True``: full unpickling runs code from the file.

Files are always opened with ``torch.load(weights_only=True)`` first, which never runs code
from the file, and zip archives are checked against their CRC-32s first (the legacy format and
safetensors have no checksum: a flipped bit in their tensor data loads silently). Before anything
is inflated, a zip archive's declared decompressed size must fit within the larger of the file's
size and the model's tensor bytes (plus :data:`ZIP_SLACK` for the pickle and small members):
``torch.save`` stores its members uncompressed, so only a re-compressed archive declares more
than its file size, and a zip bomb is refused at once. Every failure raises a :mod:`normscope.errors` class whose message names the
problem and what to do in one line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from normscope.errors import CheckpointError, ModelImportError, NormscopeWarning, UntrustedPickleError
from normscope.models import DEFAULT_MODEL, MODELS, build_model

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80
MAX_NAMED_KEYS = 6
ZIP_SLACK = 1 << 20


def load_model(checkpoint: Path | str | None, model_spec: str | None = None, trust: bool = False) -> nn.Module:
    """Return the model that ``checkpoint`` and ``model_spec`` describe.

    Args:
        checkpoint: a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, or ``None`` for no file:
            then a built-in ``model_spec`` (default ``mlp_bn``) is trained on the digits
            (:func:`normscope.train.train_reference`) and a ``package.module:factory`` is called.
        model_spec: a built-in model name or ``package.module:factory``; needed for state dicts.
        trust: allow full unpickling of a whole pickled module (runs code from the file).
            Default: False.

    Raises:
        CheckpointError: missing, unreadable or truncated file; weights that do not fit the model.
        UntrustedPickleError: the file holds pickled Python objects and ``trust`` is False.
        ModelImportError: ``model_spec`` cannot be imported or called.
        UnknownNameError: ``model_spec`` is neither a built-in name nor ``package.module:factory``.
    """
    if checkpoint is None:
        if model_spec is not None and ":" in model_spec:
            return build_from_spec(model_spec)
        from normscope.train import train_reference

        return train_reference(model_spec.strip().lower() if model_spec else DEFAULT_MODEL)
    path = Path(checkpoint)
    built: list[nn.Module] = []

    def expected_bytes() -> int:
        """The tensor bytes of the model ``model_spec`` builds (built once, kept for below)."""
        if not built:
            built.append(build_from_spec(model_spec))
        return state_bytes(built[0])

    content = read_checkpoint(path, trust=trust, expected_bytes=expected_bytes if model_spec is not None else None)
    if isinstance(content, nn.Module):
        return content
    state_dict = extract_state_dict(content, path)
    if isinstance(state_dict, nn.Module):
        return state_dict
    if model_spec is None:
        raise CheckpointError(
            f"{path} holds a state dict but no model: pass --model NAME (one of {', '.join(MODELS)}) "
            "or --model package.module:factory"
        )
    model = built[0] if built else build_from_spec(model_spec)
    load_weights(model, state_dict, path)
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of the tensors of ``model``'s state dict."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def read_checkpoint(path: Path, trust: bool = False, expected_bytes: Callable[[], int] | None = None) -> Any:
    """Read ``path`` without running code from it (unless ``trust``); diagnose what is wrong.
    ``expected_bytes`` gives the model's tensor bytes, the decompressed size a zip checkpoint
    may declare beyond its file size (:func:`check_declared_sizes`)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}; check the path")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}; pass a .pt, .pth or .safetensors file")
    with path.open("rb") as handle:
        head = handle.read(8)
    if path.suffix == ".safetensors" or looks_like_safetensors(path, head):
        return read_safetensors(path)
    if head.startswith(ZIP_MAGIC):
        verify_zip(path, expected_bytes)
    elif not head or head[0] != PICKLE_PROTOCOL_OPCODE:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (expected a file written by torch.save or safetensors)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise corrupted(path, error) from error
        if not trust:
            raise UntrustedPickleError(untrusted_message(path, str(error))) from error
    except Exception as error:  # weights-only loading runs no code: any failure is a bad file
        raise corrupted(path, error) from error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise ModelImportError(
            f"{path} is a pickled model whose code cannot be imported ({first_line(error)}); "
            "make its package importable, or save model.state_dict() and pass --model"
        ) from error
    except Exception as error:
        raise corrupted(path, error) from error


def corrupted(path: Path, error: BaseException) -> CheckpointError:
    """The one-line error for a file that is truncated or damaged."""
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupted ({type(error).__name__}: {first_line(error)}); re-save or re-download it"
    )


def verify_zip(path: Path, expected_bytes: Callable[[], int] | None = None) -> None:
    """Check a zip checkpoint's structure, its declared sizes (:func:`check_declared_sizes`,
    before anything is inflated) and every member's CRC-32 (torch.save writes them), so a flipped
    bit anywhere in the archive is an error instead of silently different weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_declared_sizes(path, archive.infolist(), expected_bytes)
            bad = archive.testzip()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted (incomplete zip archive: {first_line(error)}); re-save or re-download it"
        ) from error
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch in {bad}); re-save or re-download it")


def check_declared_sizes(path: Path, members: list[zipfile.ZipInfo], expected_bytes: Callable[[], int] | None) -> None:
    """Refuse an archive whose members declare more compressed bytes than the file holds, or more
    decompressed bytes than ``max(file size, model's tensor bytes) + ZIP_SLACK`` (the model's
    bytes are asked for only when the declared size exceeds the file's)."""
    size = path.stat().st_size
    compressed, inflated = sum(m.compress_size for m in members), sum(m.file_size for m in members)
    if compressed > size:
        raise CheckpointError(f"checkpoint {path} is corrupted (its members declare {compressed:,} bytes, the file has {size:,}); "
                              "re-save or re-download it")
    if inflated <= size + ZIP_SLACK:
        return
    model = expected_bytes() if expected_bytes is not None else 0
    if inflated > max(size, model) + ZIP_SLACK:
        against = f" and the model's {model:,} tensor bytes" if expected_bytes is not None else ""
        raise CheckpointError(
            f"checkpoint {path} declares {inflated:,} bytes once decompressed, more than its {size:,} file bytes{against}; "
            "refused before decompressing anything (torch.save writes uncompressed archives): re-save it with torch.save"
        )


def looks_like_safetensors(path: Path, head: bytes) -> bool:
    """True when ``head`` is a plausible safetensors header length followed by a JSON object."""
    if len(head) < 8:
        return False
    (header_size,) = struct.unpack("<Q", head)
    if header_size == 0 or header_size > path.stat().st_size:
        return False
    with path.open("rb") as handle:
        handle.seek(8)
        return handle.read(1) == b"{"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file on the CPU (safetensors never runs code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors runs no code: any failure is a bad file
        message = str(error)
        if "incomplete" in message or "not fully covered" in message:
            raise CheckpointError(f"checkpoint {path} is truncated (incomplete safetensors data); re-save or re-download it") from error
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(error).__name__}: {first_line(error)})") from error


def untrusted_message(path: Path, torch_message: str) -> str:
    """One line: what the pickle needs and the two ways forward."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", torch_message)
    what = f" (it needs {found.group(1)})" if found else ""
    return (
        f"{path} contains pickled Python objects{what}; loading them can run arbitrary code: "
        "pass --trust only if you trust the file, or save model.state_dict() and pass --model"
    )


def extract_state_dict(content: Any, path: Path) -> Mapping[str, torch.Tensor] | nn.Module:
    """The weights inside what ``torch.load`` returned: the dict itself or one of its known keys."""
    if not isinstance(content, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(content).__name__}, not a state dict or a model; "
            "save model.state_dict() or a dict with a 'state_dict' key"
        )
    if content and all(isinstance(v, torch.Tensor) for v in content.values()):
        return dict(content)
    for key in STATE_DICT_KEYS:
        inner = content.get(key)
        if isinstance(inner, nn.Module):
            return inner
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    keys = ", ".join(map(str, list(content)[:MAX_NAMED_KEYS])) or "none"
    raise CheckpointError(
        f"{path} is a dict without weights under {', '.join(map(repr, STATE_DICT_KEYS))} (its keys: {keys}); "
        "save model.state_dict() or put it under 'state_dict'"
    )


def unwrapped_candidates(state_dict: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state_dict`` and every form of it with ``module.`` / ``_orig_mod.`` prefixes (shared by
    all keys) removed, in any order, fewest removals first."""
    found = [dict(state_dict)]
    for keys in found:
        for prefix in WRAPPER_PREFIXES:
            if keys and all(key.startswith(prefix) for key in keys):
                stripped = {key[len(prefix):]: value for key, value in keys.items()}
                if all(set(stripped) != set(other) for other in found):
                    found.append(stripped)
    return found


def fit_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The form of ``state_dict`` (see :func:`unwrapped_candidates`) whose keys fit ``expected``;
    when none fits, the one sharing most keys (so the error names the real differences). A
    missing ``num_batches_tracked`` is filled from the model, as ``torch`` tolerates it."""
    candidates = unwrapped_candidates(state_dict)
    for candidate in candidates:
        missing = set(expected) - set(candidate)
        if set(candidate) <= set(expected) and all(key.endswith("num_batches_tracked") for key in missing):
            return {**{key: expected[key] for key in missing}, **candidate}
    return max(candidates, key=lambda candidate: len(set(candidate) & set(expected)))


def build_from_spec(spec: str) -> nn.Module:
    """Build a model from a built-in name or from ``package.module:factory`` (called with no arguments)."""
    if ":" not in spec:
        return build_model(spec)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelImportError(f"--model {spec!r} is not of the form package.module:factory")
    factory = import_attribute(module_name, attribute, spec, "--model")
    model = call_user(factory, spec, "--model") if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelImportError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def user_code_scope(spec: str) -> Iterator[None]:
    """Import and call the user's ``--model``/``--data`` code with the working directory on
    ``sys.path`` and ``sys.argv`` set to ``[spec]``, both put back afterwards: modules imported
    later (Jinja2 for the report, ...) are never looked up in the working directory, and a module
    that parses ``sys.argv`` at import does not see normscope's options."""
    saved_argv, cwd = sys.argv, os.getcwd()
    inserted = cwd not in sys.path and "" not in sys.path
    if inserted:
        sys.path.insert(0, cwd)
    sys.argv = [spec]
    try:
        yield
    finally:
        sys.argv = saved_argv
        if inserted and cwd in sys.path:
            sys.path.remove(cwd)


@contextlib.contextmanager
def contained_exit() -> Iterator[io.StringIO]:
    """Hold what the body prints on stderr: replayed when it succeeds, kept for the error
    message when it raises (argparse prints its usage before ``SystemExit``)."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield held
    sys.stderr.write(held.getvalue())


def printed(held: io.StringIO) -> str:
    """``; it printed: LAST LINE`` of what user code wrote to stderr, or nothing."""
    lines = [line.strip() for line in held.getvalue().splitlines() if line.strip()]
    return f"; it printed: {lines[-1]}" if lines else ""


def call_user(function: Callable[..., Any], spec: str, option: str, **kwargs: Any) -> Any:
    """``function(**kwargs)`` inside :func:`user_code_scope`; any failure (``SystemExit`` too)
    becomes :class:`ModelImportError`."""
    with user_code_scope(spec), contained_exit() as held:
        try:
            return function(**kwargs)
        except (Exception, SystemExit) as error:
            name = getattr(function, "__name__", type(function).__name__)
            raise ModelImportError(
                f"{option} {spec}: calling {name}() failed ({type(error).__name__}: {first_line(error)}{printed(held)})"
            ) from error


def import_attribute(module_name: str, attribute: str, spec: str, option: str) -> Any:
    """``getattr(import_module(module_name), attribute)``, importing from the working directory
    too (only while importing, see :func:`user_code_scope`)."""
    with user_code_scope(spec), contained_exit() as held:
        try:
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as error:
            raise ModelImportError(
                f"{option} {spec}: cannot import module {module_name!r} ({type(error).__name__}: {first_line(error)}{printed(held)}); "
                "check the name and that it is importable from the current directory"
            ) from error
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise ModelImportError(f"{option} {spec}: module {module_name!r} has no attribute {attribute!r}") from error


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy ``state_dict`` into ``model``, naming missing, unexpected and mis-shaped keys on
    mismatch; complex weights for real parameters are refused, other dtype casts are warned of."""
    expected = model.state_dict()
    state_dict = fit_keys(state_dict, expected)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    complex_into_real = [key for key in expected if key in state_dict and state_dict[key].is_complex() and not expected[key].is_complex()]
    problems = [
        f"{label}: {', '.join(keys[:MAX_NAMED_KEYS])}{' ...' if len(keys) > MAX_NAMED_KEYS else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped),
                            ("complex values for real tensors", complex_into_real))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"state dict in {path} does not fit {type(model).__name__} ({'; '.join(problems)}); "
            "check that --model matches the checkpoint"
        )
    casts = sorted({f"{state_dict[key].dtype} to {expected[key].dtype}" for key in expected if state_dict[key].dtype != expected[key].dtype})
    if casts:
        warnings.warn(NormscopeWarning(f"weights in {path} were cast from {', '.join(casts)} to fit {type(model).__name__}"), stacklevel=2)
    model.load_state_dict(state_dict, strict=True)


def nonfinite_weights(model: nn.Module) -> list[str]:
    """One sentence per module whose parameters or buffers hold NaN or Inf, naming the tensors."""
    found: dict[str, list[str]] = {}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        module, _, leaf = name.rpartition(".")
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        found.setdefault(module or "<root>", []).append(f"{leaf} ({nan} NaN, {inf} Inf)")
    return [f"non-finite weights in {module}: {', '.join(items)}" for module, items in found.items()]


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception message, without terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
