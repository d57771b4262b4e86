"""Files a command writes: written whole or not at all, and folders checked before any work.

Every file a command writes (tables, run logs, configs) goes through :func:`replacing`: the
content is written to a temporary file in the same folder, flushed to disk, then renamed over
the target (``os.replace``, atomic on POSIX and Windows). A write that fails (a full disk, a
read-only folder, a folder that is a file) removes the temporary file, leaves the previous file
whole and raises :class:`WriteError`, one line naming the file and the reason.

:func:`check_output_folder` is called before a command computes anything, so that an unwritable
``--out`` is refused at once instead of after the work.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_text(folder / "a.json", "[1, 2]")
    >>> (folder / "a.json").read_text()
    '[1, 2]'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fisherlab.conventions import FisherlabError


class WriteError(FisherlabError):
    """A file or folder could not be written; the previous file, if any, is left whole."""


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _mode_for(path: Path) -> int:
    """The permissions of the file being replaced, or the default ones under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents), or raise :class:`WriteError` saying why not."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"cannot write into {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"cannot create the folder {folder}: {_reason(err)}") from err
    return folder


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` if the block succeeds.

    Use it for writers that take a file name (``fig.savefig(tmp)``, ``csv`` through
    ``tmp.open("w")``). On any exception the temporary file is removed and ``path`` keeps its
    previous content; an ``OSError`` becomes a one-line :class:`WriteError`.

    Yields:
        The temporary path (in ``path``'s folder, hidden, ending in ``.tmp``).
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {_reason(err)}") from err
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # on disk before the rename makes it the file
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {_reason(err)} ({kept})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all (:func:`replacing`); returns the path."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def check_output_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written.

    The folder need not exist yet: its nearest existing ancestor must be a folder that this
    process may write. Nothing is created.

    Raises:
        WriteError: Naming the folder (``what``) and the reason.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == folder else f" ({probe} is a file)"
        raise WriteError(f"{what} {folder} is not a folder{where}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {folder} cannot be written: {probe} is read-only")
    return folder


__all__ = [
    "WriteError",
    "check_output_folder",
    "make_folder",
    "replacing",
    "write_bytes",
    "write_text",
]
