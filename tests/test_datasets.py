"""Local data readers: IDX (gzip and plain) and CIFAR-10 python batches, on tiny files."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fisherlab import data
from fisherlab.data import DataFilesError

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B}
IDX_CODES |= {np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path, array, compress):
    """An IDX file written independently of the reader: magic, big-endian sizes, data."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist_like(folder, n_train=12, n_test=5, size=6, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for i, (name, array) in enumerate(arrays.items()):
        gz = compress if isinstance(compress, bool) else compress[i]
        write_idx(folder / (name + (".gz" if gz else "")), array, gz)
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type(tmp_path, compress, dtype):
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 2)) * 50).astype(dtype)
    back = data.read_idx(write_idx(tmp_path / "x.idx", array, compress))
    assert back.shape == (3, 4, 2) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.uint8)
    path = write_idx(tmp_path / "labels-without-suffix", array, compress=True)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_read_idx_refuses_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataFilesError, match="not an IDX file"):
        data.read_idx(bad_magic)
    truncated = write_idx(tmp_path / "t", np.zeros((4, 3), np.uint8), compress=False)
    truncated.write_bytes(truncated.read_bytes()[:-2])
    with pytest.raises(DataFilesError, match=r"promises shape \(4, 3\)"):
        data.read_idx(truncated)
    with pytest.raises(DataFilesError, match="not found"):
        data.read_idx(tmp_path / "missing")


@pytest.mark.parametrize(
    "compress", [True, False, (True, False, False, True)], ids=["gzip", "plain", "mixed"]
)
def test_idx_dataset_reads_standardises_and_keeps_labels(tmp_path, compress):
    arrays = write_mnist_like(tmp_path, compress=compress)
    split = data.load("fashion-mnist", tmp_path)
    assert split.x_train.shape == (12, 1, 6, 6) and split.x_test.shape == (5, 1, 6, 6)
    assert split.x_train.dtype == torch.float32 and split.num_classes == 10
    assert split.y_train.dtype == torch.int64
    np.testing.assert_array_equal(split.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(split.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    train = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    mean, std = train.mean(), train.std()
    expected = (arrays["t10k-images-idx3-ubyte"] / 255 - mean) / std
    np.testing.assert_allclose(split.x_test[:, 0].double().numpy(), expected, rtol=1e-5)
    assert abs(float(split.x_train.mean())) < 1e-5
    assert float(split.x_train.std(unbiased=False)) == pytest.approx(1, rel=1e-5)


def test_idx_dataset_finds_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw", compress=False)
    assert data.load("mnist", tmp_path).x_train.shape == (12, 1, 6, 6)


def test_missing_idx_files_are_named(tmp_path):
    write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFilesError) as err:
        data.load("mnist", tmp_path)
    message = str(err.value)
    assert "missing t10k-labels-idx1-ubyte" in message and str(tmp_path) in message
    assert "--data-dir" in message and "nothing is downloaded" in message
    with pytest.raises(DataFilesError, match="pass --data-dir"):
        data.load("mnist")


def test_mismatched_image_and_label_counts_are_refused(tmp_path):
    write_mnist_like(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), compress=True)
    with pytest.raises(DataFilesError, match="do not match"):
        data.load("mnist", tmp_path)


def write_cifar(folder, n=4, str_keys=False, protocol=2, seed=0):
    """CIFAR-10 python batches as the original: dict with data [N, 3072] uint8 and labels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in (*data.CIFAR10_TRAIN, data.CIFAR10_TEST):
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        entry = {"batch_label": b"x", "data": images, "labels": labels, "filenames": [b"a"] * n}
        if not str_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
        batches[name] = (images, labels)
    return batches


@pytest.mark.parametrize(
    "str_keys, protocol", [(False, 2), (True, 4), (False, 5)], ids=["bytes-p2", "str-p4", "p5"]
)
def test_cifar10_reads_batches_in_channel_order(tmp_path, str_keys, protocol):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", str_keys=str_keys, protocol=protocol)
    split = data.load("cifar10", tmp_path)
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (4, 3, 32, 32)
    labels = [y for n in data.CIFAR10_TRAIN for y in batches[n][1]]
    assert split.y_train.tolist() == labels
    images, _ = batches["data_batch_2"]
    raw, _ = data.read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    # row layout: 1024 red values (row-major 32×32), then green, then blue
    assert raw[1, 1, 2, 5] == images[1, 1024 + 2 * 32 + 5]
    assert raw[3, 2, 31, 0] == images[3, 2048 + 31 * 32]
    channel_means = split.x_train.double().mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_cifar10_missing_files_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataFilesError, match="missing test_batch; searched"):
        data.load("cifar10", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar10_pickles_cannot_run_code(tmp_path, capsys):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(DataFilesError, match=r"refusing to load builtins\.print"):
        data.read_cifar_batch(tmp_path / "data_batch_1")
    assert "never run" not in capsys.readouterr().out


def test_cifar10_batch_of_wrong_shape_is_refused(tmp_path):
    entry = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (tmp_path / "b").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataFilesError, match=r"not \[N, 3072\]"):
        data.read_cifar_batch(tmp_path / "b")


def test_digits_come_from_data_module_and_names_are_checked():
    ours, theirs = data.load("digits", seed=3), data.load_digits(seed=3)
    assert torch.equal(ours.x_train, theirs.x_train) and torch.equal(ours.y_test, theirs.y_test)
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        data.load("svhn")


def test_labels_out_of_range_are_refused_naming_them(tmp_path):
    arrays = write_mnist_like(tmp_path, compress=False)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[3] = 12
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, False)
    with pytest.raises(DataFilesError, match=r"train labels must lie in \[0, 10\).*index 3: 12"):
        data.load("fashion-mnist", tmp_path)
