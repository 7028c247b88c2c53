"""Finding the normalization sites of a model and selecting among them."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator

from torch import nn
from torch.nn.utils.parametrizations import _WeightNorm

from normscope.errors import NoNormSitesError, UnknownNameError
from normscope.registry import KINDS, Recognized, looks_like_norm, recognize

from normscope.capture.record import Site


def site_name(path: str, module: nn.Module) -> str:
    """``fc.parametrizations.weight.0`` (a weight-norm parametrization) reads as ``fc.weight``."""
    if isinstance(module, _WeightNorm) and "parametrizations." in path:
        owner, rest = f".{path}".split(".parametrizations.", 1)
        return f"{owner}.{rest.rsplit('.', 1)[0]}".lstrip(".")
    return path


def module_sites(model: nn.Module) -> Iterator[tuple[str, nn.Module, Recognized]]:
    """``(site name, module, how to read it)`` for every recognised norm module."""
    for path, module in model.named_modules():
        recognized = recognize(module)
        if recognized is not None:
            yield site_name(path, module), module, recognized


def matches(name: str, kind: str, sites: str | Iterable[str] | None, kinds: str | Iterable[str] | None) -> bool:
    """Does a site pass the selection? ``sites`` are fnmatch patterns on the name, ``kinds`` kind names."""
    if sites is not None:
        patterns = [sites] if isinstance(sites, str) else list(sites)
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return False
    if kinds is not None:
        wanted = [kinds] if isinstance(kinds, str) else list(kinds)
        unknown = [k for k in wanted if k not in KINDS]
        if unknown:
            raise UnknownNameError("norm kind", unknown[0], list(KINDS))
        return kind in wanted
    return True


def find_sites(
    model: nn.Module,
    sites: str | Iterable[str] | None = None,
    kinds: str | Iterable[str] | None = None,
) -> list[Site]:
    """The model's normalization modules (in registration order) that pass the selection.

    Functional calls (``F.layer_norm`` inside a module's forward) are only seen while a model
    runs: use :func:`normscope.capture.capture` and read ``cap.sites``.

    Raises:
        NoNormSitesError: no module matches.
    """
    found = []
    for name, module, recognized in module_sites(model):
        kind = recognized.kind.name
        if matches(name, kind, sites, kinds):
            found.append(Site(name, kind, type(module).__name__))
    if not found:
        what = "" if sites is None and kinds is None else f" matching sites={sites!r} kinds={kinds!r}"
        raise NoNormSitesError(f"no normalization module{what} in {type(model).__name__}")
    return found


def find_unrecognized(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, class name)`` of modules named like a norm that normscope does not know.

    Register them with :func:`normscope.register_norm` to analyze them.
    """
    return [(path, type(m).__name__) for path, m in model.named_modules() if looks_like_norm(m)]
