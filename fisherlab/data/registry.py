"""The one registry of data sets (:data:`DATASETS`, :func:`load`); nothing downloads.

scikit-learn's digits is embedded (:mod:`fisherlab.data.split`); Fashion-MNIST, MNIST and
CIFAR-10 are read from local files by :mod:`fisherlab.data.readers`. Every command and the
experiment runner load data through :func:`load`, so adding a data set touches this file (and a
reader) only. Each data set also names the files it is read from (:func:`source_files`, default
folders included), whose content :func:`fingerprint` hashes for the experiment runner's reuse of
finished runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fisherlab.conventions import FisherlabError
from fisherlab.data.readers import cifar10_files, idx_files, load_cifar10, load_idx_dataset
from fisherlab.data.split import Split, load_digits

Loader = Callable[["str | os.PathLike | None", int, torch.dtype], Split]


@dataclass(frozen=True)
class DataSet:
    """One registered data set.

    Attributes:
        loader: ``(data_dir, seed, dtype) -> Split``.
        description: One line for help texts.
        target_accuracy: Test accuracy of the optimizer comparisons' time-to-target table.
        local_files: Whether it is read from local files (``--data-dir``).
        files: ``data_dir -> [paths]``, the files the loader reads (:func:`fingerprint`).
    """

    loader: Loader
    description: str
    target_accuracy: float
    local_files: bool = True
    files: Callable[[str | os.PathLike | None], list[Path]] | None = None


def _digits(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
    return load_digits(seed=seed, dtype=dtype)


def _idx(name: str) -> Loader:
    def loader(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
        return load_idx_dataset(name, data_dir, dtype)

    return loader


def _digits_files(data_dir: str | os.PathLike | None) -> list[Path]:
    import sklearn.datasets

    return [Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"]


def _idx_files(name: str) -> Callable[[str | os.PathLike | None], list[Path]]:
    def files(data_dir: str | os.PathLike | None) -> list[Path]:
        return list(idx_files(name, data_dir).values())

    return files


def _cifar10_files(data_dir: str | os.PathLike | None) -> list[Path]:
    return cifar10_files(data_dir)


def _cifar10(data_dir: str | os.PathLike | None, seed: int, dtype: torch.dtype) -> Split:
    return load_cifar10(data_dir, dtype)


DATASETS: dict[str, DataSet] = {
    "digits": DataSet(
        _digits,
        "scikit-learn's 8×8 digits, embedded (1,437 train / 360 test)",
        0.95,
        False,
        _digits_files,
    ),
    "fashion-mnist": DataSet(
        _idx("fashion-mnist"),
        "Fashion-MNIST IDX files (60,000 / 10,000)",
        0.85,
        files=_idx_files("fashion-mnist"),
    ),
    "mnist": DataSet(
        _idx("mnist"), "MNIST IDX files (60,000 / 10,000)", 0.97, files=_idx_files("mnist")
    ),
    "cifar10": DataSet(
        _cifar10, "CIFAR-10 python batches (50,000 / 10,000)", 0.6, files=_cifar10_files
    ),
}
"""Every data set known by name (the ``--data`` choices); readers: :mod:`fisherlab.data.readers`."""


def check_data_dir(name: str, data_dir: str | os.PathLike | None) -> None:
    """Refuse a ``data_dir`` that does not exist, or one given to an embedded data set.

    Raises:
        FisherlabError: One line naming the folder (never silently ignored).
    """
    if data_dir is None:
        return
    if name in DATASETS and not DATASETS[name].local_files:
        raise FisherlabError(f"{name} is embedded: it reads no data_dir (--data-dir)")
    if not isinstance(data_dir, str | os.PathLike) or not Path(data_dir).is_dir():
        raise FisherlabError(f"data_dir {str(data_dir)!r} is not an existing folder")


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """Load a data set of :data:`DATASETS` by name.

    Args:
        name: ``"digits"``, ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.
        data_dir: Folder of the local files (not used by digits).
        seed: Seed of the train/test split (digits only; the others ship their own split).
        dtype: Floating dtype of the images.

    Raises:
        FisherlabError: For an unknown name; :class:`fisherlab.data.DataFilesError` for
            missing files.
    """
    if name not in DATASETS:
        raise FisherlabError(f"unknown data set {name!r}; choose from {list(DATASETS)}")
    return DATASETS[name].loader(data_dir, seed, dtype)


FULL_HASH_BYTES = 256 * 2**20
"""Files up to this size are hashed whole; larger ones by :data:`SAMPLED_CHUNKS` samples."""

SAMPLED_CHUNKS = 64
"""Evenly spaced 1 MiB chunks hashed (with the size) of a file above :data:`FULL_HASH_BYTES`."""

_HASHES: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (whole up to :data:`FULL_HASH_BYTES`, else sampled + size).

    Content, not names or modification times: a file rewritten with the same size and time
    (``cp -p``, ``rsync -t``, ``tar x``) but other bytes gets another digest. Cached in the
    process by path, size, inode and change times.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256(f"{stat.st_size}|".encode())
        with path.open("rb") as handle:
            if stat.st_size <= FULL_HASH_BYTES:
                for block in iter(lambda: handle.read(2**20), b""):
                    digest.update(block)
            else:
                step = (stat.st_size - 2**20) // (SAMPLED_CHUNKS - 1)
                for i in range(SAMPLED_CHUNKS):
                    handle.seek(i * step)
                    digest.update(handle.read(2**20))
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def source_files(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files :func:`load` reads for data set ``name`` (the default folders included).

    Raises:
        FisherlabError: For an unknown name; :class:`fisherlab.data.DataFilesError` for
            missing files.
    """
    if name not in DATASETS:
        raise FisherlabError(f"unknown data set {name!r}; choose from {list(DATASETS)}")
    files = DATASETS[name].files
    return [] if files is None else files(data_dir)


def fingerprint(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """A digest of the content of every file data set ``name`` is read from.

    Each file counts by its name and :func:`file_digest`, so a data set found in a default
    folder (digits inside scikit-learn, Debian's Fashion-MNIST) has a fingerprint too.
    """
    digest = hashlib.sha256(name.encode())
    for path in source_files(name, data_dir):
        digest.update(f"|{path.name}|{file_digest(path)}".encode())
    return digest.hexdigest()
