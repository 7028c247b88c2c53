"""Shared pieces of the commands' options: flags shown as flags, defaults shown as plain text."""

from __future__ import annotations

from typing import Any

import typer


def flag(name: str, help: str) -> Any:
    """A boolean ``--name`` flag (no ``<bool>`` value shown in the help)."""
    return typer.Option(name, help=help, metavar="")


def option(*names: str, help: str, default_text: str | None = None, **kwargs: Any) -> Any:
    """An option whose help shows ``default_text`` as its default (Typer escapes it, so a
    ``<...>`` or ``[...]`` in it is not eaten as Rich markup)."""
    return typer.Option(*names, help=help, show_default=default_text if default_text is not None else kwargs.pop("show_default", True), **kwargs)
