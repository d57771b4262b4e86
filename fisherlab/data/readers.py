"""Readers of real data sets' local files, with numpy: nothing downloads.

The registry of data sets by name is :data:`fisherlab.data.DATASETS` (:func:`fisherlab.data.load`).

* **digits** (default): scikit-learn's embedded 8×8 digits (:func:`fisherlab.data.load_digits`).
* **fashion-mnist**, **mnist**: the four IDX files of the original distributions,
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``) or plain. They are looked for in
  ``data_dir`` and in torchvision's ``data_dir/FashionMNIST/raw`` (``MNIST/raw``) layout. Without
  ``data_dir``, Fashion-MNIST is also looked for where Debian's ``dataset-fashion-mnist`` package
  puts it (``/usr/share/datasets/fashion-mnist``).
* **cifar10**: the python-pickle batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch``,
  in ``data_dir`` or ``data_dir/cifar-10-batches-py``. The pickles are read with an unpickler that
  only admits numpy arrays, lists, strings and numbers, so a crafted file cannot run code.

Images are scaled to ``[0, 1]`` and standardised per channel with the mean and standard deviation
of the training split; they are returned as ``[N, C, H, W]`` float tensors with int64 labels in a
:class:`fisherlab.data.Split`.

Example:
    >>> from fisherlab import data
    >>> data.load("digits").input_shape
    (1, 8, 8)
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fisherlab.conventions import FisherlabError
from fisherlab.data.split import Split

IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
"""IDX type codes and the numpy dtypes they stand for (big-endian)."""

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four files of an MNIST-like data set (each may end in ``.gz``)."""

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

_TORCHVISION_FOLDERS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


class DataFilesError(FisherlabError, FileNotFoundError):
    """A data set's local files are missing or malformed."""


def _open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataFilesError(f"{path}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or plain.

    The header is two zero bytes, a type code (see :data:`IDX_DTYPES`), the number of
    dimensions ``k``, then ``k`` big-endian 32-bit sizes; the data follow in C order.

    Args:
        path: The file.

    Returns:
        The array, with the file's shape and a native-endian dtype.

    Raises:
        DataFilesError: If the file is missing, truncated, or not an IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFilesError(f"IDX file not found: {path}")
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataFilesError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFilesError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise DataFilesError(
            f"{path}: IDX header promises shape {shape} ({count * dtype.itemsize} bytes of "
            f"data) but the file holds {len(raw) - header}"
        )
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find(folders: Sequence[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _standardise(
    train: np.ndarray, test: np.ndarray, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``uint8`` images ``[N, C, H, W]`` to [0, 1] and standardise per channel."""
    train = train.astype(np.float64) / 255.0
    test = test.astype(np.float64) / 255.0
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    std[std == 0] = 1.0
    return (
        torch.as_tensor((train - mean) / std, dtype=dtype),
        torch.as_tensor((test - mean) / std, dtype=dtype),
    )


def idx_files(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The four IDX files of ``name`` by the keys of :data:`IDX_FILES` (as loading finds them).

    Raises:
        DataFilesError: Naming the expected files and the folders searched, when one is missing.
    """
    folders: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir)
        folders += [root, root / _TORCHVISION_FOLDERS.get(name, name) / "raw", root / name]
    elif name == "fashion-mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    found = {key: _find(folders, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in found.items() if p is None]
    if missing:
        where = ", ".join(str(f) for f in folders) or "(no folder: pass --data-dir)"
        hint = (
            " (or install Debian's dataset-fashion-mnist package)"
            if name == "fashion-mnist"
            else ""
        )
        raise DataFilesError(
            f"{name}: missing {', '.join(missing)} (each may end in .gz); searched {where}. "
            f"Put the four files {', '.join(IDX_FILES.values())} in a folder and pass it as "
            f"--data-dir{hint}; nothing is downloaded."
        )
    return found  # type: ignore[return-value]


def load_idx_dataset(
    name: str, data_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> Split:
    """Fashion-MNIST or MNIST from their four local IDX files (gzip or plain).

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"`` (only used to find files and in messages).
        data_dir: Folder with the files (or torchvision's ``FashionMNIST/raw`` below it).
        dtype: Floating dtype of the images.

    Returns:
        A split of images ``[N, 1, 28, 28]`` (the files' size) and int64 labels, 10 classes.

    Raises:
        DataFilesError: Naming the expected files and the folders searched, when one is missing.
    """
    found = idx_files(name, data_dir)
    arrays = {key: read_idx(path) for key, path in found.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataFilesError(
                f"{name}: {part} images {images.shape} and labels {labels.shape} do not match "
                "(expected [N, H, W] and [N])"
            )
    x_train, x_test = _standardise(
        arrays["train_images"][:, None], arrays["test_images"][:, None], dtype
    )
    y_train = _labels(name, "train", arrays["train_labels"])
    y_test = _labels(name, "test", arrays["test_labels"])
    return Split(x_train, y_train, x_test, y_test, 10)


def _labels(name: str, part: str, labels: np.ndarray, classes: int = 10) -> torch.Tensor:
    """int64 labels, checked to lie in ``[0, classes)`` (a clear error naming the bad ones)."""
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise DataFilesError(
            f"{name}: {part} labels must lie in [0, {classes}), but {bad.size} do not (first at "
            f"index {bad[0]}: {labels[bad[0]]})"
        )
    return torch.as_tensor(labels)


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}
"""The only globals a CIFAR-10 batch may name (numpy arrays; bytes of protocol-2 pickles)."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: no other global can be loaded."""

    def find_class(self, module: str, name: str):
        target = _PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        mod, attr = target
        if mod.startswith("numpy._core.") and not hasattr(np, "_core"):  # numpy < 2
            mod = mod.replace("numpy._core.", "numpy.core.")
        return getattr(__import__(mod, fromlist=[attr]), attr)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images ``[N, 3, 32, 32]`` uint8 and int64 labels.

    Args:
        path: A file such as ``data_batch_1`` (a pickled dict with ``data`` ``[N, 3072]`` and
            ``labels``; keys as bytes or str).

    Raises:
        DataFilesError: If the file is missing or not a CIFAR-10 batch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFilesError(f"CIFAR-10 batch not found: {path}")
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataFilesError(f"{path} is not a CIFAR-10 python batch: {err}") from err
    if not isinstance(batch, dict):
        raise DataFilesError(f"{path} is not a CIFAR-10 python batch (no dict inside)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFilesError(f"{path}: expected keys 'data' and 'labels', found {sorted(batch)}")
    images = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or images.shape[0] != len(labels):
        raise DataFilesError(
            f"{path}: data {images.shape} and labels {labels.shape} are not [N, 3072] and [N]"
        )
    return images.reshape(-1, 3, 32, 32), labels


def cifar10_files(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The six CIFAR-10 batches (five training batches, then the test batch) under ``data_dir``.

    Raises:
        DataFilesError: Naming the expected files when one is missing.
    """
    root = Path(data_dir) if data_dir is not None else None
    folders = [] if root is None else [root, root / "cifar-10-batches-py"]
    names = (*CIFAR10_TRAIN, CIFAR10_TEST)
    folder = next((f for f in folders if all((f / n).is_file() for n in names)), None)
    if folder is None:
        where = ", ".join(str(f) for f in folders) or "(no folder: pass --data-dir)"
        missing = names if root is None else [n for n in names if not (folders[0] / n).is_file()]
        raise DataFilesError(
            f"cifar10: missing {', '.join(missing)}; searched {where}. Put the python batches "
            f"{', '.join(names)} (from cifar-10-python.tar.gz) in a folder and pass it as "
            "--data-dir; nothing is downloaded."
        )
    return [folder / n for n in names]


def load_cifar10(
    data_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> Split:
    """CIFAR-10 from the local python-pickle batches.

    Args:
        data_dir: Folder with ``data_batch_1`` … ``data_batch_5`` and ``test_batch``, or the
            folder holding ``cifar-10-batches-py``.
        dtype: Floating dtype of the images.

    Returns:
        A split of images ``[N, 3, 32, 32]`` and int64 labels, 10 classes.

    Raises:
        DataFilesError: Naming the expected files when one is missing.
    """
    files = cifar10_files(data_dir)
    train = [read_cifar_batch(path) for path in files[:-1]]
    x_te, y_te = read_cifar_batch(files[-1])
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    x_train, x_test = _standardise(x_tr, x_te, dtype)
    y_train, y_test = _labels("cifar10", "train", y_tr), _labels("cifar10", "test", y_te)
    return Split(x_train, y_train, x_test, y_test, 10)


__all__ = [
    "CIFAR10_TEST",
    "CIFAR10_TRAIN",
    "IDX_DTYPES",
    "IDX_FILES",
    "DataFilesError",
    "cifar10_files",
    "idx_files",
    "load_cifar10",
    "load_idx_dataset",
    "read_cifar_batch",
    "read_idx",
]
