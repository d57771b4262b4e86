"""The experiment runner end to end: train, grid, compare-optimizers and curves on digits."""

import csv
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import fisherlab as fl
from fisherlab import cli, models
from fisherlab import experiments as ex
from fisherlab.cli.common import INTERRUPTED
from fisherlab.conventions import FisherlabError
from fisherlab.experiments.grid import _point_name
from fisherlab.experiments.runlog import _same_run

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ["--train-subset", "96", "--test-subset", "64", "--batch-size", "32", "--threads", "1"]
TINY += ["--quiet"]
"""One short epoch: 3 steps on a digits subset."""

LOG_KEYS = set(ex.ROW_KEYS)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def read_log(folder):
    payload = json.loads((folder / "log.json").read_text())
    with (folder / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    return payload, rows


@pytest.mark.parametrize("optimizer", ex.OPTIMIZER_NAMES)
def test_train_cli_writes_complete_logs_for_every_optimizer(tmp_path, optimizer, capsys):
    out = tmp_path / optimizer
    code = run_cli("train", "--optimizer", optimizer, "--epochs", 1, "--out", out, *TINY)
    assert code == 0
    assert f"{optimizer} mlp digits seed 0: finished" in capsys.readouterr().out
    payload, rows = read_log(out)
    assert payload["status"] == "finished" and len(payload["rows"]) == 2
    assert set(rows[0]) == LOG_KEYS and [r["epoch"] for r in rows] == ["0", "1"]
    last = payload["rows"][-1]
    assert last["steps"] == 3 and last["skipped_steps"] == 0
    assert 0 < last["step_time_s"] <= last["epoch_time_s"] == last["time_s"]
    assert math.isfinite(last["train_loss"]) and 0 <= last["test_accuracy"] <= 1
    assert float(rows[1]["train_loss"]) == last["train_loss"]
    config = json.loads((out / "config.json").read_text())
    cfg = ex.RunConfig.from_dict(config["run"])
    assert cfg.optimizer == optimizer and cfg.lr == ex.DEFAULT_HYPER[optimizer]["lr"]
    assert (cfg.damping is None) == (optimizer in ("sgd", "adam"))
    assert config["environment"]["torch"] == torch.__version__


def small(**kwargs):
    base = dict(epochs=2, train_subset=128, test_subset=64, batch_size=32, threads=1)
    return ex.RunConfig(**{**base, **kwargs})


@pytest.mark.parametrize("optimizer, model", [("kfac", "cnn"), ("fngd", "mlp"), ("adam", "mlp")])
def test_same_config_and_seed_give_identical_losses(tmp_path, optimizer, model):
    first = ex.train(small(optimizer=optimizer, model=model), tmp_path / "a", progress=False)
    # the run is repeated from the config file it wrote
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["run"]
    again = ex.train(ex.RunConfig.from_dict(saved), progress=False)
    other = ex.train(small(optimizer=optimizer, model=model, seed=1), progress=False)
    keys = ("train_loss", "train_loss_running", "test_loss", "test_accuracy")
    losses = [[r[k] for k in keys] for r in first.rows]
    assert losses == [[r[k] for k in keys] for r in again.rows]
    assert losses != [[r[k] for k in keys] for r in other.rows]


INTERRUPTING_MODEL = """
import torch

class Interrupting(torch.nn.Module):
    def __init__(self, input_shape, num_classes, after):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(input_shape[-1] ** 2, num_classes)
        )
        self.calls, self.after = 0, after

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return self.net(x)

def factory(input_shape, num_classes):
    return Interrupting(input_shape, num_classes, after=7)  # 3 steps per epoch: dies in epoch 3
"""


def test_ctrl_c_keeps_the_finished_epochs(tmp_path, capsys):
    model_file = tmp_path / "interrupting.py"
    model_file.write_text(INTERRUPTING_MODEL)
    out = tmp_path / "run"
    code = run_cli(
        "train", "--optimizer", "kfac", "--model", f"{model_file}:factory", "--epochs", 5,
        "--out", out, *TINY,
    )  # fmt: skip
    assert code == INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    payload, rows = read_log(out)
    assert payload["status"] == "interrupted" and "during epoch 3" in payload["note"]
    assert [r["epoch"] for r in payload["rows"]] == [0, 1, 2]
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert not list(out.glob("*.tmp"))
    config = json.loads((out / "config.json").read_text())
    assert len(config["environment"]["model_sha256"]) == 64


def test_a_real_sigint_keeps_the_finished_epochs(tmp_path):
    out = tmp_path / "run"
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from fisherlab.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["train", "--epochs", "100000", "--out", str(out), *TINY]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads((out / "log.json").read_text())["rows"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED and "interrupted" in err
    payload, rows = read_log(out)
    assert payload["status"] == "interrupted" and len(payload["rows"]) >= 3
    assert len(rows) == len(payload["rows"])


def test_user_model_factory_gets_shape_and_classes(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make(num_classes, input_shape):\n"
        "    c, h, w = input_shape\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c*h*w, num_classes))\n"
        "def no_args():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "def not_a_model(**kwargs):\n"
        "    return 3\n"
    )
    for name in ("make", "no_args"):
        model = ex.build_model(f"{tmp_path / 'net.py'}:{name}", (1, 8, 8), 10)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    result = ex.train(small(model=f"{tmp_path / 'net.py'}:make", epochs=1), progress=False)
    assert result.status == "finished"
    with pytest.raises(FisherlabError, match=r"returned int, not a torch\.nn\.Module"):
        ex.build_model(f"{tmp_path / 'net.py'}:not_a_model", (1, 8, 8), 10)
    with pytest.raises(FisherlabError, match="has no callable 'missing'"):
        ex.build_model(f"{tmp_path / 'net.py'}:missing", (1, 8, 8), 10)
    with pytest.raises(FisherlabError, match="does not exist"):
        ex.build_model(f"{tmp_path / 'nope.py'}:make", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="must look like"):
        models.load_factory("no-colon.py")


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_three_conv_one_fc_fits_every_data_set(shape):
    model = ex.build_model("3c1f", shape, 10)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 3 and len(linears) == 1
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    assert models.MODELS["3c1f"].build is models.three_conv_one_fc
    assert list(fl.capture(model, torch.nn.CrossEntropyLoss(), torch.randn(2, *shape),
                           torch.tensor([0, 1])))  # fmt: skip


def test_divergence_stops_the_run_and_is_logged(tmp_path):
    out = tmp_path / "sgd"
    argv = ["--optimizer", "sgd", "--model", "cnn", "--lr", 1e4, "--epochs", 3, "--out", out]
    assert run_cli("train", *argv, *TINY) == 1
    payload, _ = read_log(out)
    assert payload["status"] == "diverged" and "non-finite" in payload["note"]
    assert len(payload["rows"]) < 4


def test_an_optimizer_crash_is_logged_as_failed(tmp_path, monkeypatch):
    # the optimizers skip a step whose curvature cannot be inverted; a step that raises
    # anyway (a bug, an out-of-memory error) must end the run as "failed" with its logs
    calls = {"n": 0}
    original = fl.optim.KFAC.step

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("linalg broke")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fl.optim.KFAC, "step", flaky)
    with pytest.warns(RuntimeWarning, match="failed at step 3: RuntimeError: linalg broke"):
        result = ex.train(small(epochs=3), tmp_path / "k", progress=False)
    assert result.status == "failed"
    payload, _ = read_log(tmp_path / "k")
    assert payload["status"] == "failed" and "linalg broke" in payload["note"]


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    assert run_cli("train", "--device", "cuda", "--out", tmp_path, *TINY) == (
        0 if torch.cuda.is_available() else 2
    )
    if not torch.cuda.is_available():
        assert "no CUDA device" in capsys.readouterr().err
    code = run_cli("train", "--data", "fashion-mnist", "--data-dir", tmp_path, "--out", tmp_path)
    assert code == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    with pytest.raises(FisherlabError, match=r"unknown key 'optimiser' \(did you mean 'optimizer'"):
        ex.RunConfig.from_dict({"optimiser": "kfac"})
    with pytest.raises(FisherlabError, match="unknown optimizer"):
        ex.train(ex.RunConfig(optimizer="lbfgs"), progress=False)
    with pytest.raises(FisherlabError, match="batch_size must be an integer"):
        ex.RunConfig(batch_size=0).resolved()


def test_grid_search_selects_per_epoch_and_writes_tables(tmp_path):
    base = small(optimizer="kfac", epochs=2)
    grid = ex.grid_search(
        base, [1e-3, 1e-2], [1e-2, 1.0], select="train_loss", out=tmp_path, progress=False,
        extend=0,
    )  # fmt: skip
    assert len(grid.points) == 4 and [r["epoch"] for r in grid.per_epoch] == [1, 2]
    for row in grid.per_epoch:
        scores = [
            ex.load_run(tmp_path / _point_name(p["lr"], p["damping"]) / "seed0").rows[row["epoch"]][
                "train_loss"
            ]
            for p in grid.points
        ]
        assert row["train_loss"] == min(scores)
    best = min(grid.points, key=lambda p: p["final_train_loss"])
    assert grid.best == {"lr": best["lr"], "damping": best["damping"]}
    assert (tmp_path / "grid.csv").is_file() and (tmp_path / "grid-per-epoch.json").is_file()
    sgd = ex.grid_search(
        small(optimizer="sgd", epochs=1), [0.01, 0.1], [1.0], progress=False, extend=0
    )
    assert [p["damping"] for p in sgd.points] == [None, None]


def test_grid_selects_on_a_validation_split_and_never_looks_at_the_test_set(tmp_path):
    base = small(optimizer="sgd", epochs=1, train_subset=200)
    grid = ex.grid_search(base, [1e-4, 1e-3, 1e-2], out=tmp_path, progress=False, extend=0)
    runs = {p["lr"]: ex.load_run(p["runs"]) for p in grid.points}
    for run in runs.values():
        assert run.config.validation == 0.1 and not run.config.eval_test
        assert all(r["test_loss"] is None or math.isnan(r["test_loss"]) for r in run.rows)
        assert run.rows[-1]["val_loss"] > 0
    best = min(runs, key=lambda lr: runs[lr].rows[-1]["val_loss"])
    assert grid.best["lr"] == best and grid.select == "val_loss"
    with pytest.raises(FisherlabError, match="never the test set"):
        ex.grid_search(base, [1e-3], select="test_accuracy", progress=False)


def test_a_winner_on_the_edge_extends_the_grid_and_is_flagged():
    base = small(optimizer="sgd", epochs=1, momentum=0.0)
    # tiny learning rates: the largest is best, so the grid grows upwards by its own step
    grid = ex.grid_search(base, [1e-5, 1e-4], progress=False, extend=1)
    assert grid.extended == ["lr 0.001"]
    assert sorted(p["lr"] for p in grid.points) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert grid.best["lr"] == pytest.approx(1e-3) and grid.edge == ["lr high"]


def test_relative_damping_is_a_multiple_of_the_fisher_scale_at_initialisation():
    from fisherlab.scale import fisher_scale

    cfg = small(optimizer="tengrad", epochs=1, damping=0.1, relative_damping=True)
    cfg.scale_samples = 48
    result = ex.train(cfg, progress=False)
    row0 = result.rows[0]
    # the same model and probe samples, measured independently
    split = fl.data.load("digits")
    ex.seed_everything(cfg.seed)
    model = ex.build_model("mlp", split.input_shape, 10).eval()
    x, y = split.x_train[:48], split.y_train[:48]
    problem = fl.Problem(model, torch.nn.CrossEntropyLoss(), (x, y), fisher_type="empirical")
    lam = fisher_scale(problem).lambda_max
    assert row0["lambda_max"] == pytest.approx(lam, rel=1e-5)
    assert row0["damping"] == pytest.approx(0.1 * lam, rel=1e-5)
    assert row0["damping_ratio"] == pytest.approx(0.1)
    assert 0 < result.rows[1]["direction_cosine"] <= 1
    assert result.rows[1]["lambda_max"] != row0["lambda_max"]  # measured again after the epoch


def test_train_cli_grid(tmp_path, capsys):
    code = run_cli(
        "train", "--optimizer", "ekfac", "--grid", "--grid-lr", 0.001, 0.01, "--grid-damping",
        0.1, "--grid-extend", 0, "--epochs", 1, "--out", tmp_path, *TINY,
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "per-epoch best (val_loss)" in out and "best at the last epoch: lr" in out
    assert "ON THE EDGE of the grid: lr" in out  # two learning rates: the best is on an edge
    assert len(ex.find_runs([tmp_path])) == 2


def test_time_to_target_and_summary():
    rows = [
        {"epoch": 0, "test_accuracy": 0.1, "time_s": 0.0},
        {"epoch": 1, "test_accuracy": 0.8, "time_s": 1.5},
        {"epoch": 2, "test_accuracy": 0.95, "time_s": 3.0},
    ]
    assert ex.time_to_target(rows, 0.9) == (3.0, 2)
    assert ex.time_to_target(rows, 0.8) == (1.5, 1)
    assert ex.time_to_target(rows, 0.99) is None


def test_compare_optimizers_and_curves_end_to_end(tmp_path, capsys):
    config = {
        "out": str(tmp_path / "runs"),
        "seeds": [0, 1],
        "target_accuracy": 0.3,
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "train_subset": 96,
            "test_subset": 64,
            "threads": 1,
        },
        "grid": {
            "*": {"lr": [0.003], "damping": [0.01, 0.1]},
            "sgd": {"lr": [0.03, 0.1]},
            "extend": 0,
        },
        "experiments": [
            {"model": "mlp", "optimizers": {"sgd": {"lr": 0.05}, "tengrad": {"lr": 0.003}}}
        ],
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    figures = tmp_path / "figs"
    args = ["compare-optimizers", "--config", path, "--quiet"]
    assert (
        run_cli(*args, "--grid", "--update-config", "--figures", figures, "--formats", "png") == 0
    )
    out = capsys.readouterr().out
    assert "grid search, best at the last epoch" in out and "| digits | mlp | sgd |" in out
    tuned = json.loads(path.read_text())["experiments"][0]["optimizers"]
    assert tuned["sgd"]["lr"] in (0.03, 0.1) and tuned["tengrad"]["damping"] in (0.01, 0.1)
    for name in ("curves-digits-mlp", "optimizers-digits-step-time"):
        assert (figures / f"{name}.png").stat().st_size > 10_000
    table = json.loads((figures / "optimizers-digits-time-to-target.json").read_text())
    assert [r["optimizer"] for r in table["rows"]] == ["sgd", "tengrad"]
    assert all(r["seeds"] == 2 and r["reached"].endswith("/2") for r in table["rows"])
    assert table["rows"][0]["vs_sgd"] == 1.0
    assert (figures / "optimizers-digits-time-to-target.md").read_text().startswith("| data |")

    # a second call reuses the finished runs; curves redraws from the folders
    assert run_cli(*args) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert run_cli("curves", tmp_path / "runs", "--out", tmp_path / "again") == 0
    assert "4 runs" in capsys.readouterr().out  # the grid runs are left out
    assert (tmp_path / "again" / "curves-digits-mlp.pdf").read_bytes().startswith(b"%PDF")
    assert run_cli("curves", tmp_path / "nothing-here", "--out", tmp_path) == 2


def test_bad_experiment_files_are_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"experiments": [{"model": "mlp", "optimizers": {"lbfgs": {}}}]}))
    with pytest.raises(FisherlabError, match="unknown key 'lbfgs'"):
        ex.load_experiment(path)
    path.write_text(json.dumps({"experiment": []}))
    with pytest.raises(FisherlabError, match="unknown key"):
        ex.load_experiment(path)
    path.write_text("{not json")
    with pytest.raises(FisherlabError, match="not valid JSON"):
        ex.load_experiment(path)


def test_the_shipped_digits_config_is_valid():
    from pathlib import Path

    config = ex.load_experiment(Path(__file__).parents[1] / "configs" / "digits.json")
    names = [set(e["optimizers"]) for e in config["experiments"]]
    assert all(n == set(ex.OPTIMIZER_NAMES) for n in names)
    assert config["seeds"] == [0, 1, 2]


def test_a_run_folder_is_locked_while_written_and_an_ended_run_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = small(epochs=1)
    out.mkdir()
    (out / ".lock").write_text(
        json.dumps({"pid": os.getpid(), "host": platform.node(), "run": "kfac x", "started": "t"})
    )
    with pytest.raises(fl.FisherlabError, match=r"being written by another run \(kfac x, process"):
        ex.train(cfg, out, progress=False)
    assert not (out / "config.json").exists()  # the other run's folder is left alone
    # a lock whose process has ended is taken over
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    (out / ".lock").write_text(json.dumps({"pid": int(child.stdout), "host": platform.node()}))
    assert ex.train(cfg, out, progress=False).status == "finished"
    assert not (out / ".lock").exists()  # released
    with pytest.raises(fl.FisherlabError, match=r"holds an ended run \(finished"):
        ex.train(cfg, out, progress=False)
    assert not (out / ".lock").exists()
    assert run_cli("train", "--epochs", 1, "--out", out, *TINY) != 0
    assert "pass --overwrite" in capsys.readouterr().err
    assert run_cli("train", "--epochs", 1, "--out", out, "--overwrite", *TINY) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--option", "bogus=3"], r"KFAC has no argument\(s\) \['bogus'\]"),
        (
            ["train", "--optimizer", "skfac", "--option", "spatial_samples=abc"],
            "spatial_samples must be a positive integer, got 'abc'",
        ),
        (["curves", "--formats", "bogus"], "figure format 'bogus' is not supported"),
    ],
)
def test_cli_errors_are_one_line_with_status_2_and_leave_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    extra = [tmp_path] if argv[0] == "curves" else TINY
    try:
        code = run_cli(*argv, "--out", out, *extra)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_factory_that_raises_is_one_line_and_leaves_nothing(tmp_path, capsys):
    model_file = tmp_path / "bad.py"
    model_file.write_text("def make(**kw):\n    raise ValueError('boom in my factory')\n")
    out = tmp_path / "run"
    assert run_cli("train", "--model", f"{model_file}:make", "--out", out, *TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raised ValueError: boom in my factory" in err[0], err
    assert not out.exists()


def test_a_finished_run_is_reused_only_with_the_same_model_file(tmp_path):
    model_file = tmp_path / "net.py"
    model_file.write_text(
        "import torch\n"
        "def make(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n"
    )
    cfg = small(epochs=1, model=f"{model_file}:make").resolved()
    out = tmp_path / "run"
    ex.train(cfg, out, progress=False)
    assert _same_run(out, cfg)
    model_file.write_text(model_file.read_text() + "# changed\n")
    assert not _same_run(out, cfg)  # the config text is the same, the file is not


def test_quick_variant_shrinks_the_protocol_and_keeps_the_full_config_apart(tmp_path):
    experiment = ex.load_experiment(ROOT / "configs" / "fashion-mnist.json")
    quick = ex.quick_variant(experiment)
    assert quick["train"]["epochs"] == 2 and quick["train"]["train_subset"] == 640
    assert quick["out"].endswith("-quick") and quick["figures"].endswith("quick")
    assert quick["grid"]["seeds"] == [10] and experiment["grid"] != quick["grid"]
    assert experiment["train"].get("train_subset") is None  # the full config is untouched
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(experiment))
    code = run_cli("compare-optimizers", "--config", config, "--quick", "--update-config")
    assert code == 2


def test_grid_train_overrides_apply_to_the_grid_only(tmp_path):
    experiment = {
        "train": {"epochs": 1, "batch_size": 32, "train_subset": 128, "test_subset": 64},
        "seeds": [0],
        "grid": {
            "sgd": {"lr": [0.01, 0.1]},
            "extend": 0,
            "validation": 0.2,
            "train": {"train_subset": 100},
        },
        "experiments": [{"model": "mlp", "optimizers": {"sgd": {}}}],
    }
    runs, grids = ex.compare_optimizers(
        experiment, tmp_path, grid=True, progress=False, warmup=False, log=lambda _: None
    )
    grid_runs = [ex.load_run(f) for f in ex.find_runs([tmp_path / "grid"])]
    assert {r.config.train_subset for r in grid_runs} == {100}
    assert runs[0].config.train_subset == 128 and runs[0].config.validation == 0
    assert runs[0].config.lr == grids["mlp", "sgd"].best["lr"]


def test_tuned_configs_are_written_compact_and_read_back_unchanged():
    from fisherlab.cli.compare_optimizers import dump_json

    value = {
        "seeds": [0, 1],
        "grid": {"edge": ["lr high"], "extended": [], "select": "val_loss", "note": "a,\tb, c"},
        "experiments": [{"model": "mlp", "optimizers": {"kfac": {"lr": 0.1, "damping": None}}}],
        "description": "λ/λ_max",
    }
    text = dump_json(value)
    assert json.loads(text) == value
    assert '"grid": {"edge": ["lr high"], "extended": [], "select": "val_loss", "note": ' in text
    assert '"seeds": [0, 1],' in text and "λ/λ_max" in text


def test_sets_that_are_not_logged_are_not_evaluated(monkeypatch):
    from fisherlab.experiments import runner

    sizes = []
    real = runner.evaluate

    def counting(model, x, y, batch_size=1024):
        sizes.append(x.shape[0])
        return real(model, x, y, batch_size)

    monkeypatch.setattr(runner, "evaluate", counting)
    cfg = small(optimizer="sgd", epochs=1, validation=0.25, eval_test=False, eval_train=False)
    result = ex.train(cfg, progress=False)
    # 128 training samples: 96 train, 32 validation; the 64 test samples are never evaluated
    assert sizes == [32, 32]
    assert result.rows[-1]["test_loss"] is None and result.rows[-1]["val_loss"] > 0
    assert result.rows[-1]["train_loss"] == result.rows[-1]["train_loss_running"]
