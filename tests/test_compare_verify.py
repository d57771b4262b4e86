"""fl.compare and fl.verify, and their commands."""

import json

import pytest
import torch
from torch import nn

import fisherlab as fl
from fisherlab import cli
from fisherlab.blocks import ekfac as ekfac_module


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    return (
        model,
        nn.CrossEntropyLoss(),
        torch.randn(6, 1, 4, 4, dtype=torch.float64),
        torch.randint(0, 3, (6,)),
    )


def test_compare_rows_are_complete_and_consistent():
    model, loss_fn, x, y = _problem()
    rows = fl.compare(model, loss_fn, x, y, progress=False)
    methods = {r["method"] for r in rows}
    assert methods == {
        "kfac",
        "ekfac",
        "woodbury",
        "woodbury:conv_gram=reduce_sum",
        "skfac",
        "diag",
    }
    assert {r["layer"] for r in rows} == {"0", "3"}
    by = {(r["layer"], r["method"]): r for r in rows}
    for layer in ("0", "3"):
        assert by[layer, "woodbury"]["rel_frobenius"] == 0.0
        assert by[layer, "woodbury"]["direction_cosine"] == pytest.approx(1.0)
        assert by[layer, "ekfac"]["rel_frobenius"] <= by[layer, "kfac"]["rel_frobenius"] + 1e-12
        for r in (by[layer, m] for m in methods):
            assert r["build_s"] >= 0 and r["solve_s"] >= 0 and r["memory_mb"] > 0
    # reduce-sum is an approximation for the convolution, exact for the linear head
    assert by["0", "woodbury:conv_gram=reduce_sum"]["rel_frobenius"] > 0.01
    assert by["3", "woodbury:conv_gram=reduce_sum"]["rel_frobenius"] < 1e-6
    dense = fl.curvature("exact", model, loss_fn, x, y)["0"].to_dense()
    kfac = fl.curvature("kfac", model, loss_fn, x, y)["0"].to_dense()
    assert by["0", "kfac"]["rel_frobenius"] == pytest.approx(
        fl.metrics.frobenius_error(dense, kfac), rel=1e-6
    )


def test_verify_on_a_users_model_reports_every_check():
    model, loss_fn, x, y = _problem()
    report = fl.verify(model, loss_fn, x[:1], y[:1], progress=False)
    assert report.ok
    names = {c.check for c in report.checks}
    assert names == {"ekfac<=kfac", "woodbury-solve", "skfac=kfac-inverse", "kfac-exact-one-sample"}
    assert {c.problem for c in report.checks} == {"model/true", "model/mc", "model/empirical"}


def test_verify_names_a_violation(monkeypatch):
    """A broken EKFAC (scalings of KFAC's eigenvalues times 3) must be caught and named."""
    original = ekfac_module.kfe_squares
    monkeypatch.setattr(ekfac_module, "kfe_squares", lambda *args: 3 * original(*args))
    model, loss_fn, x, y = _problem()
    report = fl.verify(model, loss_fn, x, y, fisher_types=["true"], progress=False)
    assert not report.ok
    assert {v.check for v in report.violations} == {"ekfac<=kfac"}


def test_verify_command_exit_status_and_files(tmp_path, capsys, monkeypatch):
    args = [
        "verify",
        "--batch-sizes",
        "1",
        "5",
        "--seeds",
        "0",
        "--fisher-types",
        "empirical",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "ekfac<=kfac" in out and "woodbury-solve" in out
    saved = json.loads((tmp_path / "verify.json").read_text())
    assert all(r["ok"] for r in saved["rows"])
    original = ekfac_module.kfe_squares
    monkeypatch.setattr(ekfac_module, "kfe_squares", lambda *a: 3 * original(*a))
    assert cli.main(args) == 1
    assert (
        "VIOLATION ekfac<=kfac on mlp-tanh-bias-ce/N5/empirical/seed0 layer"
        in capsys.readouterr().err
    )


def test_compare_command_prints_and_saves(tmp_path, capsys):
    args = [
        "compare",
        "--model",
        "cnn",
        "--samples",
        "16",
        "--batch-size",
        "8",
        "--fisher-type",
        "empirical",
        "--methods",
        "kfac",
        "ekfac",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    assert "approximations of the empirical Fisher of cnn on digits" in capsys.readouterr().out
    rows = json.loads((tmp_path / "compare-cnn-digits-empirical.json").read_text())["rows"]
    assert [(r["layer"], r["method"]) for r in rows][:2] == [("0", "kfac"), ("0", "ekfac")]
