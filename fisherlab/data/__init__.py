"""Data sets, read with numpy from what ships or what the user has: nothing downloads.

* :mod:`fisherlab.data.split`: :class:`Split` (a train/test split) and scikit-learn's embedded
  digits (:func:`load_digits`);
* :mod:`fisherlab.data.readers`: readers of local IDX (Fashion-MNIST, MNIST) and CIFAR-10 files;
* :mod:`fisherlab.data.registry`: every data set by name (:data:`DATASETS`, :func:`load`), the
  files each is read from and their content fingerprint.
"""

from fisherlab.data.readers import (
    CIFAR10_TEST,
    CIFAR10_TRAIN,
    DEBIAN_FASHION_MNIST,
    IDX_FILES,
    DataFilesError,
    cifar10_files,
    idx_files,
    load_cifar10,
    load_idx_dataset,
    read_cifar_batch,
    read_idx,
)
from fisherlab.data.registry import (
    DATASETS,
    DataSet,
    check_data_dir,
    file_digest,
    fingerprint,
    load,
    source_files,
)
from fisherlab.data.split import Split, load_digits

__all__ = [
    "CIFAR10_TEST",
    "CIFAR10_TRAIN",
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "IDX_FILES",
    "DataFilesError",
    "DataSet",
    "Split",
    "check_data_dir",
    "cifar10_files",
    "file_digest",
    "fingerprint",
    "idx_files",
    "load",
    "load_cifar10",
    "load_digits",
    "load_idx_dataset",
    "read_cifar_batch",
    "read_idx",
    "source_files",
]
