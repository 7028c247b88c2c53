"""Every file normscope writes, and every file it reads from a folder it did not just create.

A folder handed over by someone else (a monitor run, an analysis output) may hold planted
entries: a symbolic link named like a table or a temporary file, a FIFO, a folder where a file
belongs. Two helpers make those harmless:

* :func:`write_file` creates a new file with a unique name beside the target (``mkstemp``:
  ``O_CREAT | O_EXCL``, so nothing that exists is ever opened for writing), writes it and
  renames it over the target in one step. ``rename(2)`` replaces a symbolic link itself, never
  the file it points to; a folder at the target is refused. The file's mode follows the umask.
* :func:`read_bytes` opens a file inside a folder one path component at a time, relative to the
  folder, with ``O_NOFOLLOW`` (a symbolic link anywhere below the folder is refused) and
  ``O_NONBLOCK`` (a FIFO cannot block the open), then reads it only if ``fstat`` says it is a
  regular file; :func:`list_files` lists a folder inside the folder the same way. The folder
  itself may be a link: the user named it.

Text cells of CSV tables are neutralised against spreadsheet formula injection (OWASP's rule:
a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
``'``) by :func:`csv_safe`; Parquet keeps the raw values.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import pandas as pd

from normscope.errors import OutputError

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
TEMPORARY_SUFFIX = ".partial"
MAX_STEM = 40
KINDS = {stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO", stat.S_IFDIR: "folder", stat.S_IFSOCK: "socket",
         stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe(error: OSError) -> str:
    """``strerror`` of an OS error, else its text."""
    return error.strerror or str(error)


def write_file(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(stream)`` on a new, uniquely named file beside ``path``, then rename it over
    ``path`` (atomic: readers see the old file or the new one). On any error or interrupt the
    temporary file is removed and ``path`` is as it was.

    Raises:
        OutputError: ``path`` is a folder, or the file cannot be created, written or renamed
            (read-only or full file system, no permission).
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"cannot write {path}: it is a folder; nothing was changed")
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name[:MAX_STEM]}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
        os.fchmod(handle, 0o666 & ~umask())
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise OutputError(f"cannot write {path} ({describe(error)}); nothing was changed") from error
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
    return path


def write_text(path: Path | str, text: str) -> Path:
    """:func:`write_file` of ``text`` in UTF-8."""
    return write_file(path, lambda stream: stream.write(text.encode("utf-8")))


def write_csv(path: Path | str, table: pd.DataFrame) -> Path:
    """:func:`write_file` of ``table`` as CSV without the index, text cells :func:`csv_safe`."""
    return write_text(path, csv_safe(table).to_csv(index=False))


def write_parquet(path: Path | str, table: pd.DataFrame) -> Path:
    """:func:`write_file` of ``table`` as Parquet without the index (raw values)."""
    return write_file(path, lambda stream: table.to_parquet(stream, index=False))


def formula_safe(value: object) -> object:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run as a formula."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def csv_safe(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` whose text cells and column names are :func:`formula_safe`; numbers
    (negative ones included) are untouched."""
    safe = table.rename(columns=formula_safe)
    for column in safe.columns[(safe.dtypes == object).to_numpy() | (safe.dtypes == "string").to_numpy()]:
        safe[column] = safe[column].map(formula_safe)
    return safe


def read_bytes(path: Path | str, folder: Path | str) -> bytes:
    """The content of the regular file ``path`` inside ``folder`` (see :func:`open_inside`).

    Raises:
        OutputError: ``path`` is not inside ``folder``, is missing, or it (or a folder on the way)
            is a symbolic link, a FIFO, a folder, a socket or a device (one line naming it).
    """
    handle = open_inside(Path(path), Path(folder), directory=False)
    try:
        os.set_blocking(handle, True)
        with os.fdopen(os.dup(handle), "rb") as stream:
            return stream.read()
    except OSError as error:
        raise OutputError(f"cannot read {path} ({describe(error)})") from error
    finally:
        os.close(handle)


def list_files(path: Path | str, folder: Path | str, suffixes: tuple[str, ...], prefix: str = "") -> list[Path]:
    """The entries of the folder ``path`` inside ``folder`` whose names start with ``prefix`` and
    end with one of ``suffixes``, sorted (``path`` is opened as :func:`open_inside` does; the
    entries are checked when :func:`read_bytes` reads them).

    Raises:
        OutputError: ``path`` or a folder on the way is not a real folder (one line naming it).
    """
    path = Path(path)
    handle = open_inside(path, Path(folder), directory=True)
    try:
        names = os.listdir(handle)
    except OSError as error:
        raise OutputError(f"cannot list {path} ({describe(error)})") from error
    finally:
        os.close(handle)
    return [path / name for name in sorted(names) if name.startswith(prefix) and name.endswith(suffixes)]


def open_inside(path: Path, folder: Path, directory: bool) -> int:
    """A descriptor of ``path`` inside ``folder``: every component below ``folder`` is opened
    relative to the previous one with ``O_NOFOLLOW`` (the last also ``O_NONBLOCK``, so a FIFO
    cannot block) and must be a folder, the last a regular file (a folder when ``directory``).
    ``folder`` itself may be a link: the user named it."""
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        raise OutputError(f"{path} is not inside {folder}; normscope reads only files inside the folder it is given") from None
    if ".." in parts or (not parts and not directory):
        raise OutputError(f"{path} is not a file inside {folder}; normscope reads only files inside the folder it is given")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        current = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise OutputError(f"cannot open folder {folder} ({describe(error)})") from error
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        entry, want_file = folder.joinpath(*parts[: depth + 1]), last and not directory
        try:
            following = os.open(part, flags | (os.O_NONBLOCK if want_file else os.O_DIRECTORY), dir_fd=current)
        except OSError as error:
            raise refusal(entry, current, part, error, want_file) from error
        finally:
            os.close(current)
        current = following
        kind = stat.S_IFMT(os.fstat(current).st_mode)
        if kind != (stat.S_IFREG if want_file else stat.S_IFDIR):
            os.close(current)
            raise unusable(entry, KINDS.get(kind, "special file"), want_file)
    return current


def refusal(entry: Path, parent: int, name: str, error: OSError, last: bool) -> OutputError:
    """The one-line error for an entry that ``os.open`` refused: what it is, if it exists
    (``last``: a regular file was expected there, else a folder)."""
    try:
        kind = stat.S_IFMT(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return OutputError(f"cannot read {entry} ({describe(error)})")
    expected = stat.S_IFREG if last else stat.S_IFDIR
    if kind == expected:
        return OutputError(f"cannot read {entry} ({describe(error)})")
    return unusable(entry, KINDS.get(kind, "special file"), last)


def unusable(entry: Path, kind: str, last: bool = True) -> OutputError:
    """The one-line error for an entry of the wrong kind (``last``: where a file belongs)."""
    return OutputError(f"{entry} is a {kind}, not a {'regular file' if last else 'folder'}; normscope reads only regular files "
                       "inside the folder it is given (no links, FIFOs or devices): remove it or pass a folder written by normscope")
