"""Atomic output folders: stage beside the target, rename into place, never clobber, clean up.

* :func:`write_folder_atomic` writes into a staging folder ``.<name>.<random>.partial`` beside
  the output and renames it into place at the end: the output appears complete or not at all.
* Without ``overwrite`` the final rename refuses an output that another run created meanwhile
  (``rename(2)`` does not replace a non-empty folder): the later run fails with
  :class:`~normscope.errors.OutputError` and the first output stays.
* Every staging folder holds a marker file naming its process; a stale one (its process is gone
  or it is older than a day) is swept by the next run in the same parent folder. A folder
  without the marker is never removed.
* Folders and files get the modes of the user's umask (``mkdtemp`` alone would give 0700).
* An ``out`` that is a symbolic link (dangling or not) is refused before anything runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from normscope.errors import OutputError
from normscope.safe_io import describe, umask

MARKER = ".normscope-staging"
STAGING_SUFFIX = ".partial"
STALE_SECONDS = 24 * 3600
MAX_STEM = 40


def check_out_path(out: Path) -> None:
    """Refuse ``.``, ``..``, a file system root, a symbolic link (dangling or not: the output
    would land wherever it points) or a name the file system cannot hold."""
    if os.path.islink(out):
        target = os.readlink(out)
        state = "" if out.exists() else ", which does not exist"
        raise OutputError(f"--out {out} is a symbolic link (to {target}{state}); normscope writes only to a real path: pass the folder itself or a new name")
    if out.name in ("", ".", "..") or out.resolve() == Path(out.resolve().anchor):
        raise OutputError(f"--out {out} names the current, parent or root folder; pass a new folder name such as {out / 'normscope-out'}")
    try:
        limit = os.pathconf(existing_ancestor(out), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(out.name)) > limit:
        raise OutputError(f"output folder name {out.name[:40]}... is longer than the file system allows ({limit} bytes); choose a shorter --out")


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            return parent
    return Path("/")


def exists(path: Path) -> bool:
    """``path.exists()`` that turns an unusable path into :class:`OutputError`."""
    try:
        return path.exists()
    except OSError as error:
        raise OutputError(f"cannot use output path {path} ({describe(error)}); choose another --out") from error


def make_staging(out: Path) -> Path:
    """A new staging folder beside ``out`` with its marker, mode following the umask."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name[:MAX_STEM]}.", suffix=STAGING_SUFFIX, dir=out.parent))
    os.chmod(staging, 0o777 & ~umask())
    (staging / MARKER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return staging


def is_stale(folder: Path) -> bool:
    """True for a normscope staging folder (it has the marker) whose process is gone or that is
    older than a day; False for anything else."""
    marker = folder / MARKER
    try:
        host, pid = marker.read_text().split()
        age = time.time() - marker.stat().st_mtime
    except (OSError, ValueError):
        return False
    if age > STALE_SECONDS:
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the stale staging folders of earlier, killed runs in ``parent``; return them."""
    swept = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(STAGING_SUFFIX)]
    except OSError:
        return swept
    for folder in candidates:
        if folder.is_dir() and not folder.is_symlink() and is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def write_folder_atomic(out: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Call ``write(staging)`` on a staging folder beside ``out``, then move it into place (see
    :func:`move_into_place`); on any error or interrupt the staging folder is removed and the
    exception propagates.

    Raises:
        OutputError: the staging folder cannot be created, or ``out`` appeared meanwhile.
    """
    check_out_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent)
        staging = make_staging(out)
    except OSError as error:
        raise OutputError(f"cannot create output folder {out} ({describe(error)}); choose another --out") from error
    try:
        write(staging)
        (staging / MARKER).unlink()
        move_into_place(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` to ``out``. Without ``overwrite`` only a missing or empty ``out`` is
    replaced (atomically, by the rename); with it an existing ``out`` is moved into a marked
    staging folder first and removed after the rename."""
    try:
        os.rename(staging, out)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"cannot write output folder {out} ({describe(error)}); choose another --out") from error
        if not overwrite:
            raise OutputError(
                f"output folder {out} was created by someone else while this run was writing; "
                "nothing was replaced: choose another --out or pass --overwrite"
            ) from error
    retired = make_staging(out)
    os.replace(out, retired / out.name)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
