"""Nothing lost, nothing silent: atomic files, protected run folders, fingerprints, schemas.

The probes of issue 22, small: a full disk and a read-only folder under every writer, a run
killed with ``kill -9`` (status ``running``, the lock of a dead process), edited model modules
and rewritten data files, config typos and wrong types, a run whose every step was skipped.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fisherlab import cli, data, files
from fisherlab import experiments as ex
from fisherlab.conventions import FisherlabError
from fisherlab.experiments.runlog import _same_run

TINY = ["--train-subset", "96", "--test-subset", "64", "--batch-size", "32", "--threads", "1"]
TINY += ["--epochs", "1", "--quiet"]
"""One short epoch: 3 steps on a digits subset."""


def run_cli(*argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fisherlab") and "Traceback" not in err[0], err
    return err[0]


def small(**kwargs) -> ex.RunConfig:
    settings = {"epochs": 1, "train_subset": 96, "test_subset": 64, "batch_size": 32}
    return ex.RunConfig(**{**settings, "threads": 1, **kwargs})


def dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


# ------------------------------------------------------------------------ atomic files
class _FullDisk:
    """``open`` for :mod:`fisherlab.files` whose writes stop half-way with ENOSPC."""

    def __init__(self, only: str = ""):
        self.only = only

    def __call__(self, name, mode="r", *args, **kwargs):
        handle = open(name, mode, *args, **kwargs)  # noqa: SIM115 (returned)
        if "w" not in mode or self.only not in Path(name).name:
            return handle
        write = handle.write

        def half_then_full(data):
            write(data[: len(data) // 2])
            handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = half_then_full
        return handle


def test_a_write_is_whole_or_absent_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    files.write_text(path, '{"old": 1}\n')
    os.chmod(path, 0o640)
    files.write_text(path, '{"new": 2}\n')
    assert path.read_text() == '{"new": 2}\n'
    assert path.stat().st_mode & 0o777 == 0o640  # the replaced file's permissions kept
    monkeypatch.setattr(files, "open", _FullDisk(), raising=False)
    with pytest.raises(files.WriteError, match=r"No space left on device \(the previous file"):
        files.write_text(path, '{"newer": 3}\n' * 1000)
    assert json.loads(path.read_text()) == {"new": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # no temporary file left


def test_a_read_only_folder_is_one_error_and_leaves_the_file(tmp_path, monkeypatch):
    path = files.write_text(tmp_path / "t.csv", "a\n1\n")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refused)
    with pytest.raises(files.WriteError, match=r"cannot write .*t.csv: Permission denied"):
        files.write_text(path, "b\n2\n")
    assert path.read_text() == "a\n1\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert run_cli("exact", "--samples", "4", "--out", folder / "sub", "--quiet") == 2
        assert "is read-only" in one_error_line(capsys)
    finally:
        folder.chmod(0o755)


def test_a_full_disk_under_compare_keeps_the_first_results_whole(tmp_path, capsys, monkeypatch):
    argv = ["exact", "--model", "cnn", "--samples", "4", "--out", tmp_path, "--quiet"]
    assert run_cli(*argv) == 0
    saved = tmp_path / "exact-cnn-digits-true.json"
    first = saved.read_text()
    capsys.readouterr()
    monkeypatch.setattr(files, "open", _FullDisk(), raising=False)
    assert run_cli(*argv) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "previous file is kept" in line
    assert saved.read_text() == first and json.loads(first)["rows"]


def _grid_config(path: Path, runs: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "out": str(runs),
                "seeds": [0],
                "train": {"epochs": 1, "train_subset": 200, "test_subset": 32, "threads": 1},
                "grid": {"sgd": {"lr": [0.1]}, "seeds": [0], "extend": 0},
                "experiments": [{"model": "mlp", "optimizers": {"sgd": {"lr": 0.3}}}],
            },
            indent=2,
        )
    )


def test_update_config_on_a_full_disk_leaves_the_config_valid(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.json"
    _grid_config(config, tmp_path / "runs")
    before = config.read_text()
    monkeypatch.setattr(files, "open", _FullDisk(only="c.json"), raising=False)
    code = run_cli("compare-optimizers", "--config", config, "--grid", "--update-config",
                   "--quiet")  # fmt: skip
    assert code == 2
    assert "No space left on device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert config.read_text() == before and json.loads(before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_update_config_needs_grid_and_a_writable_place(tmp_path, capsys):
    config = tmp_path / "c.json"
    _grid_config(config, tmp_path / "runs")
    assert run_cli("compare-optimizers", "--config", config, "--update-config") == 2
    assert "give it with --grid" in one_error_line(capsys)


# ------------------------------------------------------------------------ run folders
def _killed(folder: Path, cfg: ex.RunConfig) -> None:
    """What ``kill -9`` during epoch 1 leaves: status running, one row, a dead process's lock."""
    ex.train(cfg, folder, progress=False)
    log = json.loads((folder / "log.json").read_text())
    log["status"], log["rows"] = "running", log["rows"][:1]
    (folder / "log.json").write_text(json.dumps(log))
    lock = {"pid": dead_pid(), "host": platform.node(), "run": cfg.label, "started": "t"}
    (folder / ".lock").write_text(json.dumps(lock))


def test_a_killed_run_is_not_replaced_by_another_configuration(tmp_path, capsys):
    folder = tmp_path / "run"
    _killed(folder, small(optimizer="kfac"))
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}
    assert run_cli("train", "--optimizer", "sgd", "--out", folder, *TINY) == 2
    line = one_error_line(capsys)
    assert "holds a run that did not end (status running, epochs 0-0 logged" in line
    assert "of another configuration" in line and "optimizer 'kfac' → 'sgd'" in line
    assert "pass --overwrite" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # lock released too
    assert run_cli("train", "--optimizer", "sgd", "--out", folder, "--overwrite", *TINY) == 0
    assert json.loads((folder / "log.json").read_text())["run"]["optimizer"] == "sgd"
    assert "fisherlab: warning: replacing a run that did not end" in capsys.readouterr().err


def test_replacing_an_ended_run_by_another_configuration_says_so(tmp_path):
    folder = tmp_path / "run"
    ex.train(small(), folder, progress=False)
    with pytest.warns(ex.RunFolderWarning, match=r"replacing the finished run .* \(lr 0.3 → 0.1"):
        ex.train(small(lr=0.1), folder, progress=False, overwrite=True)


def test_a_killed_run_of_the_same_configuration_says_why_it_restarts(tmp_path, capsys):
    folder = tmp_path / "run"
    _killed(folder, small(optimizer="kfac"))
    pid = json.loads((folder / ".lock").read_text())["pid"]
    assert run_cli("train", "--optimizer", "kfac", "--out", folder, *TINY) == 0
    err = capsys.readouterr().err
    assert f"fisherlab: warning: run folder {folder} holds a run that did not end" in err
    assert f"process {pid} is gone" in err and "restarts from epoch 0" in err
    assert json.loads((folder / "log.json").read_text())["status"] == "finished"


def test_a_folder_with_only_a_config_or_a_damaged_log_is_kept(tmp_path):
    folder = tmp_path / "run"
    ex.train(small(), folder, progress=False)
    (folder / "log.json").unlink()  # killed before its first epoch was logged
    with pytest.raises(FisherlabError, match=r"no epoch logged.*of another configuration"):
        ex.train(small(optimizer="sgd"), folder, progress=False)
    (folder / "log.json").write_text('{"run": {"optim')  # damaged by hand
    with pytest.raises(FisherlabError, match=r"log\.json that cannot be read"):
        ex.train(small(), folder, progress=False)
    assert ex.train(small(), folder, progress=False, overwrite=True).status == "finished"


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    folder = tmp_path / "fresh"
    lock_holder = tmp_path / "held"
    lock_holder.mkdir()
    lock = {"pid": os.getpid(), "host": platform.node(), "run": "other", "started": "t"}
    (lock_holder / ".lock").write_text(json.dumps(lock))
    with pytest.raises(FisherlabError, match="being written by another run"):
        ex.train(small(), lock_holder, progress=False)
    with pytest.raises(FisherlabError, match="train_subset=5000 exceeds the 1,437"):
        ex.train(small(train_subset=5000), folder, progress=False)
    assert not folder.exists()


# ------------------------------------------------------------------------ fingerprints
def _write_model(folder: Path, width: int) -> str:
    (folder / "widths.py").write_text(f"WIDTH = {width}\n")
    (folder / "net.py").write_text(
        "import torch\n"
        "from widths import WIDTH\n"
        "def make(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, WIDTH),\n"
        "                               torch.nn.Tanh(), torch.nn.Linear(WIDTH, num_classes))\n"
    )
    return f"{folder / 'net.py'}:make"


def test_a_model_importing_a_sibling_module_runs_and_its_edit_is_noticed(tmp_path):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    spec = _write_model(models_dir, 16)
    cfg = small(model=spec).resolved()
    out = tmp_path / "run"
    result = ex.train(cfg, out, progress=False)  # the sibling `widths` imports
    assert result.status == "finished" and "widths" not in sys.modules
    assert result.environment["model_files"] == ["net.py", "widths.py"]
    assert _same_run(out, cfg)
    (models_dir / "widths.py").write_text("WIDTH = 64\n")  # only the imported module changes
    assert not _same_run(out, cfg)


@pytest.mark.parametrize(
    "source, found",
    [
        ("import helpers.layers\n", ["helpers/__init__.py", "helpers/layers.py"]),
        ("from helpers import layers\n", ["helpers/__init__.py", "helpers/layers.py"]),
        ("from .helpers.layers import Block\n", ["helpers/__init__.py", "helpers/layers.py"]),
        ("import torch, numpy\n", []),
    ],
    ids=["import-dotted", "from-package-import-module", "relative", "third-party-only"],
)
def test_model_sources_follow_local_imports(tmp_path, source, found):
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("")
    (tmp_path / "helpers" / "layers.py").write_text("import math\nBlock = 1\n")
    (tmp_path / "net.py").write_text(source)
    names = [p.relative_to(tmp_path).as_posix() for p in ex.model_sources(tmp_path / "net.py")]
    assert names == sorted(["net.py", *found])


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fashion_files(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for part, n in (("train", 20), ("t10k", 10)):
        _idx(folder / f"{part}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(folder / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n))


def test_data_rewritten_with_the_same_sizes_and_times_is_noticed(tmp_path):
    folder = tmp_path / "fashion"
    folder.mkdir()
    _fashion_files(folder, 0)
    before = data.fingerprint("fashion-mnist", folder)
    images = folder / "train-images-idx3-ubyte"
    stat = images.stat()
    other = tmp_path / "other"
    other.mkdir()
    _fashion_files(other, 1)
    images.write_bytes((other / images.name).read_bytes())  # as `cp -p` or `rsync -t` do
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert images.stat().st_size == stat.st_size and images.stat().st_mtime_ns == stat.st_mtime_ns
    assert data.fingerprint("fashion-mnist", folder) != before


def test_data_found_in_the_default_folder_has_a_fingerprint(tmp_path, monkeypatch):
    _fashion_files(tmp_path, 0)
    monkeypatch.setattr(data.readers, "DEBIAN_FASHION_MNIST", tmp_path)  # no --data-dir
    assert data.source_files("fashion-mnist") == [tmp_path / n for n in data.IDX_FILES.values()]
    env = ex.environment(ex.RunConfig(data="fashion-mnist"))
    assert env["data_sha256"] == data.fingerprint("fashion-mnist", tmp_path)
    digits = ex.environment(ex.RunConfig())["data_sha256"]  # scikit-learn's embedded file
    assert len(digits) == 64 and digits != env["data_sha256"]


# ------------------------------------------------------------------------ schemas
def _experiment(**changes) -> dict:
    cfg = {
        "seeds": [0],
        "train": {"epochs": 1, "train_subset": 64, "test_subset": 32},
        "grid": {"sgd": {"lr": [0.1]}, "seeds": [0]},
        "experiments": [{"model": "mlp", "optimizers": {"sgd": {"lr": 0.1}, "kfac": {}}}],
    }
    for key, value in changes.items():
        target = cfg
        *parents, last = key.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grid.seed": [1]}, r"grid: unknown key 'seed' \(did you mean 'seeds'\?\)"),
        ({"experiment": []}, r"unknown key 'experiment' \(did you mean 'experiments'\?\)"),
        ({"train.momentun": 0.5}, r"unknown key 'momentun' \(did you mean 'momentum'\?\)"),
        ({"experiments.0.optimizers.kfca": {}}, r"unknown key 'kfca' \(did you mean 'kfac'"),
        ({"experiments.0.optimizers.sgd.lr_": 1}, r"unknown key 'lr_' \(did you mean 'lr'"),
        ({"train.momentum": "0.9"}, "momentum must lie in .*got '0.9'"),
        ({"train.epochs": 2.0}, "epochs must be an integer, got 2.0"),
        ({"seeds": [0.5]}, r"seeds must be an integer, got 0\.5"),
        ({"seeds": "0 1"}, "seeds: must be a list of integer seeds"),
        ({"seeds": [-1]}, r"seeds must be an integer in \[0, 4294967296\)"),
        ({"experiments": {"model": "mlp"}}, "experiments: must be a non-empty list"),
        ({"grid.sgd": {"lrs": [0.1]}}, r"unknown key 'lrs' \(did you mean 'lr'\?\)"),
        ({"grid.kfac": {"damping": [0.1]}}, "grid.kfac: needs 'lr'"),
        ({"grid.sgd": {"lr": []}}, "grid.sgd.lr: must list at least one value"),
        ({"grid.sgd": {"lr": [-0.1]}}, r"grid.sgd.lr must lie in \(0"),
        ({"grid.extend": -1}, "grid.extend must be an integer >= 0"),
        ({"experiments.0.optimizers.sgd.lr": "0.1"}, r"sgd.lr must lie in \(0"),
        ({"experiments.0.optimizers.sgd.damping": 0.1}, "sgd has no damping"),
        ({"target_accuracy": 95}, r"target_accuracy: must be an accuracy in \(0, 1\]"),
        ({"train.seed": 3}, "train.seed: is set per run by 'seeds'"),
        ({"grid.train": {"lr": 0.1}}, "grid.train.lr: is set per run by"),
        ({"seeds": [1, 1]}, r"seeds: repeats a seed: \[1, 1\]"),
    ],
    ids=[
        "grid-seed-typo", "top-typo", "train-typo", "optimizer-typo", "hyper-typo",
        "momentum-string", "epochs-float", "seeds-float", "seeds-string", "seeds-negative",
        "experiments-dict", "grid-entry-typo", "grid-entry-without-lr", "grid-lr-empty",
        "grid-lr-negative", "grid-extend-negative", "lr-string", "sgd-damping",
        "target-percent", "train-seed", "grid-train-lr", "seeds-repeated",
    ],
)  # fmt: skip
def test_config_files_are_checked_by_schema_before_anything_runs(
    tmp_path, capsys, changes, message
):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_experiment(**changes)))
    with pytest.raises(FisherlabError, match=message):
        ex.load_experiment(config)
    out = tmp_path / "runs"
    assert run_cli("compare-optimizers", "--config", config, "--out", out, "--quiet") == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train.train_subset": 100000}, "train_subset=100000 exceeds the 1,437 training"),
        ({"experiments.0.optimizers.kfac": {"options": {"bogus": 1}}}, r"KFAC has no argument"),
        ({"experiments.0.optimizers.sgd.options": {"foo": 1}}, "unexpected keyword argument"),
        ({"experiments.0.model": "missing.py:make"}, "does not exist"),
    ],
    ids=["subset-beyond-data", "kfac-option", "sgd-option", "model-file"],
)
def test_a_bad_run_in_the_last_experiment_is_refused_before_the_first_runs(
    tmp_path, capsys, changes, message
):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_experiment(**changes)))
    out = tmp_path / "runs"
    assert run_cli("compare-optimizers", "--config", config, "--out", out, "--quiet") == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists()


# ------------------------------------------------------------------------ the CLI's list
@pytest.mark.parametrize(
    "source, message",
    [
        ("def make(:\n    pass\n", "has a syntax error at line 1"),
        ("import not_a_module_anywhere\n", "raised ModuleNotFoundError"),
        (
            "import torch\ndef make(num_classes):\n"
            "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 10))\n",
            r"does not take digits's inputs of shape 1×8×8 \(RuntimeError: mat1 and mat2",
        ),
        (
            "import torch\ndef make(num_classes):\n"
            "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n",
            r"maps digits's inputs of shape 1×8×8 to \(2, 3\); expected \[batch, 10\]",
        ),
    ],
    ids=["syntax-error", "import-error", "input-size", "output-size"],
)
def test_a_bad_model_file_is_one_line_and_leaves_nothing(tmp_path, capsys, source, message):
    model_file = tmp_path / "net.py"
    model_file.write_text(source)
    out = tmp_path / "run"
    assert run_cli("train", "--model", f"{model_file}:make", "--out", out, *TINY) == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "is not valid JSON"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "rows"}),
         "incomplete run log: no 'rows'"),
        (lambda text: json.dumps({**json.loads(text), "rows": []}), "no epoch rows"),
        (lambda text: json.dumps({**json.loads(text), "run": {"optimiser": "x"}}),
         "unknown key 'optimiser'"),
    ],
    ids=["truncated", "no-rows", "empty-rows", "bad-run"],
)  # fmt: skip
def test_curves_of_a_damaged_log_is_one_line(tmp_path, capsys, damage, message):
    folder = tmp_path / "run"
    ex.train(small(), folder, progress=False)
    log = folder / "log.json"
    log.write_text(damage(log.read_text()))
    figures = tmp_path / "figures"
    assert run_cli("curves", folder, "--out", figures, "--formats", "png") == 2
    assert re.search(message, one_error_line(capsys))
    assert not figures.exists()


def test_a_damaged_log_among_others_is_skipped_with_a_line(tmp_path, capsys):
    ex.train(small(), tmp_path / "runs" / "a", progress=False)
    ex.train(small(seed=1), tmp_path / "runs" / "b", progress=False)
    (tmp_path / "runs" / "b" / "log.json").write_text("{")
    out = tmp_path / "figures"
    assert run_cli("curves", tmp_path / "runs", "--out", out, "--formats", "png") == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "b/log.json is not valid JSON" in err


# ------------------------------------------------------------------------ skipped steps
def test_a_run_whose_every_step_was_skipped_says_so_and_is_marked(tmp_path, capsys):
    folder = tmp_path / "run"
    code = run_cli("train", "--optimizer", "kfac", "--damping", "1e-300", "--out", folder, *TINY)
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "kfac mlp digits seed 0: every step (3 of 3) was skipped: the parameters never moved ("
    ), err
    log = json.loads((folder / "log.json").read_text())
    assert log["status"] == "finished" and log["note"].startswith("every step (3 of 3)")
    run = ex.load_run(folder)
    table = ex.summarise([run])
    assert table[0]["optimizer"] == "kfac [every step skipped]"
    assert table[0]["skipped_steps"] == 3
    assert "kfac [every step skipped]" in ex.markdown_table(table)
    assert run_cli("curves", folder, "--out", tmp_path / "f", "--formats", "png") == 0
    captured = capsys.readouterr()
    assert "every step (3 of 3) was skipped" in captured.err
    assert "| kfac [every step skipped] |" in captured.out


def test_some_skipped_steps_are_counted_in_the_table(tmp_path):
    ex.train(small(), tmp_path / "run", progress=False)
    run = ex.load_run(tmp_path / "run")
    run.rows[-1]["skipped_steps"] = 2
    table = ex.summarise([run])
    assert table[0]["optimizer"] == "kfac" and table[0]["skipped_steps"] == 2
    assert "| kfac (2 steps skipped) |" in ex.markdown_table(table)


def test_a_grid_whose_validation_split_cannot_work_is_refused_before_it_runs(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_experiment()))  # 64 training samples: 6 held out, 10 classes
    out = tmp_path / "runs"
    assert run_cli("compare-optimizers", "--config", config, "--out", out, "--grid") == 2
    assert "validation=0.1 of 64 training samples leaves too few" in one_error_line(capsys)
    assert not out.exists()


def test_an_optimizer_named_but_absent_from_the_config_is_refused(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_experiment()))
    out = tmp_path / "runs"
    code = run_cli("compare-optimizers", "--config", config, "--out", out, "--optimizers", "ekfac")
    assert code == 2
    assert "optimizers ['ekfac'] are in no experiment" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--damping", "0.1"], ["--relative-damping"]], ids=str)
def test_a_damping_given_to_sgd_is_refused_not_ignored(tmp_path, capsys, flag):
    out = tmp_path / "run"
    assert run_cli("train", "--optimizer", "sgd", *flag, "--out", out, *TINY) == 2
    assert f"sgd has no damping: {flag[0]} would be ignored" in one_error_line(capsys)
    assert not out.exists()


def test_a_registered_model_is_fingerprinted_by_its_builder(monkeypatch):
    from fisherlab import models

    before = ex.model_fingerprint("mlp")
    assert before[1] == ["fisherlab.models.mlp"] and before != ex.model_fingerprint("cnn")
    entry = models.MODELS["mlp"]
    wider = models.ModelEntry(entry.build, lambda shape, c: entry.build(64, (256,), c), "w")
    monkeypatch.setitem(models.MODELS, "mlp", wider)  # the registry edited: another model
    assert ex.model_fingerprint("mlp")[0] != before[0]


def test_figures_and_their_tables_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from fisherlab.analysis import FigureData
    from fisherlab.plots.base import save_figure

    table = FigureData("t", {"rows": [{"a": 1.0, "b": "x"}]}, {"k": 1})
    old_paths = table.save(tmp_path, "fig")
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    (png,) = save_figure(fig, tmp_path / "fig", formats=("png",))
    before = {p: p.read_bytes() for p in [*old_paths, png]}

    def failing_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"half a figure")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(files.WriteError, match="the previous file is kept"):
        save_figure(fig, tmp_path / "fig", formats=("png",))
    assert png.read_bytes() == before[png]
    monkeypatch.setattr(files, "open", _FullDisk(only=".json"), raising=False)
    with pytest.raises(files.WriteError, match="No space left on device"):
        FigureData("t", {"rows": [{"a": 2.0, "b": "y"}] * 500}, {"k": 2}).save(tmp_path, "fig")
    csv_path, json_path = old_paths
    assert json_path.read_bytes() == before[json_path]  # the failed file: the old one, whole
    assert csv_path.read_text().splitlines() == ["a,b"] + ["2,y"] * 500  # the new one, whole
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
