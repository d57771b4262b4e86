"""Figures: the data behind each figure (shapes, invariants) and readable PNGs (quick path)."""

import argparse
import json
import math
import runpy
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image

import fisherlab as fl
from fisherlab import analysis as an
from fisherlab import plots
from fisherlab.blocks import build_block
from fisherlab.capture import capture
from fisherlab.cli import figures as figures_cli
from fisherlab.comparison import batch_gradients
from fisherlab.metrics import frobenius_error

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "cnn")
EXACT = 1e-10  # relative tolerance of quantities that are equal in exact arithmetic


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def figure_data():
    """Every family's data for both quick models, computed once (float64)."""
    problems = figures_cli._Problems(figures_cli.Settings(seed=0, quick=True, progress=False))
    cache = {}

    def get(model, family):
        if (model, family) not in cache:
            cache[model, family] = figures_cli.FAMILIES[family](problems, model)
        return cache[model, family]

    get.problems = problems
    return get


def _layers(figure_data, model):
    prob = figure_data.problems.get(model)
    ((x, y),) = an.figure_batches(prob, 8)
    return capture(prob.model, prob.loss_fn, x, y)


# ---------------------------------------------------------------------------------- setup
@pytest.mark.parametrize("model", MODELS)
def test_figure_problem_is_float64_and_seeded(model):
    a = an.figure_problem(model, seed=3, quick=True)
    b = an.figure_problem(model, seed=3, quick=True)
    assert all(p.dtype == torch.float64 for p in a.model.parameters())
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    (x1, _), (x2, _) = an.figure_batches(a, 16, count=2)
    assert x1.shape == (16, 1, 8, 8) and not torch.equal(x1, x2)


def test_exact_spectrum_matches_dense_eigenvalues(figure_data):
    cap = _layers(figure_data, "mlp")  # N=8, R=10: layer 1 has P=520 > M=80 (Gram route)
    for name in cap:
        dense = torch.linalg.eigvalsh(build_block("exact", cap, name).to_dense()).flip(0)
        got = an.exact_spectrum(cap, name)
        assert got.shape == dense.shape
        assert torch.allclose(got, dense.clamp_min(0), rtol=0, atol=EXACT * float(dense[0]))


# ------------------------------------------------------------------------------- 1. heatmaps
@pytest.mark.parametrize("model", MODELS)
def test_heatmap_data(figure_data, model):
    data = figure_data(model, "heatmaps")
    meta = data.meta
    matrices = an.rows_to_matrices(data.rows("inverse"))
    assert list(matrices) == ["exact", *an.HEATMAP_METHODS]
    for m in matrices.values():
        assert m.shape == (meta["shown"], meta["shown"])
        assert torch.allclose(m, m.T, rtol=0, atol=1e-8 * float(m.abs().max()))
    assert meta["damping"] > 0 and meta["P"] <= 200
    assert meta["fisher_type"] == "empirical" and meta["reference"] == "network"
    assert "loss" in meta["state"] and meta["training"]["epoch"] == 3
    summary = {r["method"]: r for r in data.rows("summary")}
    # Woodbury is the exact layer block; only the block-diagonal approximation separates it
    assert summary["woodbury"]["rel_frobenius_block"] < EXACT
    assert summary["woodbury"]["rel_frobenius_inverse"] > 1e-3
    assert summary["ekfac"]["rel_frobenius_block"] <= summary["kfac"]["rel_frobenius_block"]
    # the exact panel is the layer's block of the whole network's (F + λI)⁻¹
    prob = figure_data.problems.get(model)
    ((x, y),) = an.figure_batches(prob, figures_cli.Settings(quick=True).batch_size)
    full = fl.exact_fisher(prob.model, prob.loss_fn, x, y, fisher_type="empirical")
    eye = torch.eye(len(full.matrix), dtype=full.matrix.dtype)
    s = full.slices[meta["layer"]]
    reference = torch.linalg.inv(full.matrix + meta["damping"] * eye)[s, s]
    reference = reference[: meta["shown"], : meta["shown"]]
    assert frobenius_error(reference, matrices["exact"]) < 1e-7  # CSV-free, float64


def test_heatmaps_crop_large_layers():
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 8)
    data = an.block_heatmaps(prob.model, prob.loss_fn, x, y, layer="1", max_params=30)
    assert data.meta["P"] == 520 and data.meta["shown"] == 30
    assert all(m.shape == (30, 30) for m in an.rows_to_matrices(data.rows("inverse")).values())


# ------------------------------------------------------------------------------ 2. Frobenius
@pytest.mark.parametrize("model", MODELS)
def test_frobenius_data(figure_data, model):
    data = figure_data(model, "frobenius")
    rows = data.rows("errors")
    settings = figures_cli.Settings(quick=True)
    layers = {r["layer"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == an.default_methods(figure_data.problems.get(model).model)
    assert len(rows) == settings.seeds * settings.batches * len(layers) * len(methods)
    assert all(r["rel_frobenius"] >= 0 and math.isfinite(r["rel_frobenius"]) for r in rows)
    err = {(r["seed"], r["batch"], r["layer"], r["method"]): r["rel_frobenius"] for r in rows}
    for (seed, batch, layer, method), value in err.items():
        if method == "ekfac":  # EKFAC's theorem, on every layer, seed and batch
            assert value <= err[seed, batch, layer, "kfac"] * (1 + EXACT) + EXACT


def test_frobenius_at_scale_agrees_with_dense_blocks():
    prob = an.figure_problem("cnn", quick=True)
    batches = an.figure_batches(prob, 8)
    methods = an.default_methods(prob.model)
    rows = an.frobenius_errors([prob.model], prob.loss_fn, batches, methods).rows("errors")
    cap = capture(prob.model, prob.loss_fn, *batches[0])
    for r in rows:
        from fisherlab.blocks import parse_method

        method, options = parse_method(r["method"])
        exact = build_block("exact", cap, r["layer"]).to_dense()
        approx = build_block(method, cap, r["layer"], **options).to_dense()
        assert r["rel_frobenius"] == pytest.approx(frobenius_error(exact, approx), rel=1e-6)


# -------------------------------------------------------------------------------- 3. spectra
@pytest.mark.parametrize("model", MODELS)
def test_spectra_data(figure_data, model):
    data = figure_data(model, "spectra")
    rows = data.rows("eigenvalues")
    sizes = {info["layer"]: info["P"] for info in data.meta["layers"]}
    methods = ["exact", *an.APPROXIMATIONS]  # over the training set: no Woodbury reduce-sum
    for layer, size in sizes.items():
        for method in methods:
            values = np.array(
                [r["eigenvalue"] for r in rows if r["layer"] == layer and r["method"] == method]
            )
            assert len(values) == size
            assert np.all(np.diff(values) <= 0), (layer, method)
            assert values.min() >= -EXACT * values.max(), (layer, method)
    assert {(r["layer"], r["method"]) for r in data.rows("distance")} == {
        (layer, m) for layer in sizes for m in methods[1:]
    }


def test_spectra_state_the_rank_of_the_true_cross_entropy_fisher():
    # 6 samples, C = 10: the true Fisher has 60 rows but rank ≤ 6·9 = 54
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 6)
    data = an.spectra(prob.model, prob.loss_fn, x, y, methods=["kfac"])
    assert data.meta["rank_bound"] == 54
    rows = [r for r in data.rows("eigenvalues") if r["method"] == "exact"]
    for layer in {r["layer"] for r in rows}:
        values = np.array([r["eigenvalue"] for r in rows if r["layer"] == layer])
        nonzero = int((values > 1e-10 * values[0]).sum())
        assert 6 < nonzero <= 54, layer  # more than the empirical bound N, at most N(C−1)
    empirical = an.spectra(
        prob.model, prob.loss_fn, x, y, methods=["kfac"], fisher_type="empirical"
    )
    assert empirical.meta["rank_bound"] == 6


# --------------------------------------------------------------------- 4. sample correlation
@pytest.mark.parametrize("model", MODELS)
def test_sample_correlation_data(figure_data, model):
    data = figure_data(model, "sample_correlation")
    n = figures_cli.Settings(quick=True).correlation_batch
    matrices = an.rows_to_matrices(data.rows("correlation"), key="layer")
    assert list(matrices) == [info["layer"] for info in data.meta["layers"]]
    for c in matrices.values():
        assert c.shape == (n, n)
        assert torch.allclose(c.diagonal(), torch.ones(n, dtype=c.dtype), rtol=0, atol=EXACT)
        assert torch.allclose(c, c.T, rtol=0, atol=EXACT) and c.abs().max() <= 1 + EXACT
    labels = [r["label"] for r in data.rows("labels")]
    assert labels == sorted(labels) and len(labels) == n
    sim = {(r["layer_a"], r["layer_b"]): r for r in data.rows("similarity")}
    for (a, b), r in sim.items():
        assert r["pearson"] == pytest.approx(sim[b, a]["pearson"], abs=EXACT)
        assert r["adjacent"] == (abs(list(matrices).index(a) - list(matrices).index(b)) == 1)
        if a == b:
            assert r["pearson"] == pytest.approx(1.0, abs=EXACT) and r["rel_distance"] == 0


# ---------------------------------------------------------------------- 5. KFE correlation
@pytest.mark.parametrize("model", MODELS)
def test_kfe_correlation_data(figure_data, model):
    data = figure_data(model, "kfe_correlation")
    matrices = an.rows_to_matrices(data.rows("correlation"), key="basis")
    shown = data.meta["shown"]
    assert set(matrices) == {"parameter", "kfe"}
    for basis, c in matrices.items():
        assert c.shape == (shown, shown)
        defined = ~torch.isnan(c.diagonal())
        assert int((~defined).sum()) == data.meta["masked"][basis]
        d = c.diagonal()[defined]
        assert torch.allclose(d, torch.ones_like(d), rtol=0, atol=EXACT)
        keep = c[defined][:, defined]
        assert torch.allclose(keep, keep.T, rtol=0, atol=EXACT) and keep.abs().max() <= 1 + 1e-8
    summary = data.rows("summary")
    assert len(summary) == 2 * len({r["layer"] for r in summary})
    assert all(0 <= r["mean_abs_offdiag"] <= 1 for r in summary)
    # energy off the diagonal: of F = diag's squared error; of QᵀFQ = EKFAC's squared error
    reference = figure_data.problems.reference(model, "empirical")
    exact = fl.curvature("exact", reference)
    ekfac = fl.curvature("ekfac", reference)
    for r in summary:
        f = exact[r["layer"]].to_dense()
        approx = torch.diag(f.diagonal()) if r["basis"] == "parameter" else None
        if approx is None:
            approx = ekfac[r["layer"]].to_dense()
        assert r["offdiag_energy"] == pytest.approx(frobenius_error(f, approx) ** 2, rel=1e-8)


def test_kfe_correlation_masks_the_null_directions_of_the_last_layer():
    # softmax output gradients sum to zero over classes, so Γ of the last layer is singular
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 32)
    data = an.kfe_decorrelation(prob.model, prob.loss_fn, x, y, layer="5")
    assert data.meta["masked"]["kfe"] == 7  # one null direction of Γ × (6 inputs + bias)


# ---------------------------------------------------------------------------- 7. directions
@pytest.mark.parametrize("model", MODELS)
def test_direction_data(figure_data, model):
    data = figure_data(model, "directions")
    rows = data.rows("directions")
    assert all(-1 - EXACT <= r["cosine"] <= 1 + EXACT for r in rows)
    lams = sorted({r["relative_damping"] for r in rows})
    assert len(lams) == 19
    # with damping much larger than the curvature every direction is the gradient
    assert all(r["cosine"] > 0.99 for r in rows if r["relative_damping"] == lams[-1])
    assert {"zero", "identity"} <= {r["method"] for r in rows}


def test_direction_of_the_exact_block_is_exact():
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 8)
    rows = an.direction_quality_vs_damping(
        prob.model, prob.loss_fn, x, y, methods=["woodbury", "exact"], dampings=[1e-4, 1e-1]
    ).rows("directions")
    exact = [r for r in rows if not r["baseline"]]
    assert all(abs(r["cosine"] - 1) < 1e-8 and r["relative_error"] < 1e-7 for r in exact)


def test_direction_baselines_and_relative_damping_match_dense():
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 8)
    data = an.direction_quality_vs_damping(
        prob.model, prob.loss_fn, x, y, methods=["kfac"], relative_dampings=[1e-3, 1.0]
    )
    cap = fl.capture(prob.model, prob.loss_fn, x, y, fisher_type="true")
    grads = batch_gradients(fl.capture(prob.model, prob.loss_fn, x, y, fisher_type="empirical"))
    rows = data.rows("directions")

    def row(name: str, method: str, rel: float) -> dict:
        (found,) = [
            r for r in rows
            if (r["layer"], r["method"]) == (name, method)
            and abs(r["relative_damping"] / rel - 1) < 1e-9
        ]  # fmt: skip
        return found

    for name in cap:
        f = build_block("exact", cap, name).to_dense()
        top = float(torch.linalg.eigvalsh(f)[-1])
        g = grads[name]
        eye = torch.eye(len(f), dtype=f.dtype)
        for rel in (1e-3, 1.0):
            lam = rel * top
            d = torch.linalg.solve(f + lam * eye, g)
            r = row(name, "zero", rel)
            assert r["damping"] == pytest.approx(lam, rel=1e-9)
            cos = float(g @ d / (g.norm() * d.norm()))
            assert r["cosine"] == pytest.approx(cos, rel=1e-9)
            err = float((g / lam - d).norm() / d.norm())
            assert r["relative_error"] == pytest.approx(err, rel=1e-8)
            ident = row(name, "identity", rel)
            d_id = g / (float(f.trace()) / len(f) + lam)
            assert ident["relative_error"] == pytest.approx(
                float((d_id - d).norm() / d.norm()), rel=1e-8
            )


# ------------------------------------------------------------------------- data round trip
def test_figure_data_round_trip(figure_data, tmp_path):
    for family in ("kfe_correlation", "decomposition"):
        data = figure_data("mlp", family)
        data.save(tmp_path, family)
        back = an.FigureData.load(tmp_path, family)
        assert back.name == data.name and back.meta == data.meta
        for key, rows in data.tables.items():
            assert len(back.tables[key]) == len(rows)
            for a, b in zip(rows, back.tables[key]):
                assert a.keys() == b.keys()
                for column, value in a.items():
                    assert type(b[column]) is type(value)  # layer names stay strings
                    if isinstance(value, float) and not math.isnan(value):
                        assert b[column] == pytest.approx(value, rel=1e-7, abs=1e-300)
                    elif not isinstance(value, float):
                        assert b[column] == value


def test_matrix_rows_round_trip():
    m = {"a": torch.randn(3, 3, dtype=torch.float64), "b": torch.eye(3, dtype=torch.float64)}
    back = an.rows_to_matrices(an.matrix_rows(m))
    assert all(torch.equal(back[k], m[k]) for k in m)


# ---------------------------------------------------------------------------------- figures
def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels.std() > 5  # not blank


@pytest.mark.parametrize("family", list(figures_cli.FAMILIES))
def test_every_figure_function_writes_a_readable_png(figure_data, family, tmp_path):
    data = figure_data("cnn" if family in ("heatmaps", "frobenius", "spatial") else "mlp", family)
    data.meta["model"] = "test model"
    fig = plots.PLOTS[family](data)
    assert isinstance(fig, matplotlib.figure.Figure)
    paths = plots.save_figure(fig, tmp_path / family, formats=("png",))
    assert paths == [tmp_path / f"{family}.png"]
    _check_png(paths[0])
    assert fig.get_suptitle().endswith("test model")
    labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in fig.axes)
    assert any(ax.get_xlabel() for ax in fig.axes) and any(ax.get_ylabel() for ax in fig.axes)
    assert "[" in labels or "dimensionless" in labels or "index" in labels  # units


def test_plots_do_not_touch_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    prob = an.figure_problem("mlp", quick=True)
    ((x, y),) = an.figure_batches(prob, 8)
    plots.plot_spectra(an.spectra(prob.model, prob.loss_fn, x, y))
    assert plt.get_fignums() == before


# ---------------------------------------------------------------------------------- command
def _parser():
    parser = argparse.ArgumentParser()
    figures_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_writes_figures_data_and_redraws_from_data(tmp_path, capsys):
    out = tmp_path / "figs"
    argv = ["figures", "--quick", "--quiet", "--model", "mlp", "--out", str(out)]
    args = _parser().parse_args([*argv, "--only", "sample_correlation"])
    assert args.model == "mlp" and args.threads == 1 and args.seed == 0
    threads = torch.get_num_threads()
    assert args.func(args) == 0
    assert torch.get_num_threads() == threads
    names = {p.name for p in out.iterdir()}
    stem = "mlp-sample_correlation"
    assert {f"{stem}.png", f"{stem}.pdf", f"{stem}.json", f"{stem}-correlation.csv"} <= names
    assert (out / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    png = out / f"{stem}.png"
    png.unlink()
    args = _parser().parse_args([*argv, "--only", "sample_correlation", "--from-data"])
    assert args.func(args) == 0
    _check_png(png)
    assert "1 figures in" in capsys.readouterr().out


def test_parser_defaults():
    args = _parser().parse_args(["figures"])
    assert (args.model, args.out, args.quick, args.only) == ("all", "figures", False, None)


def test_analysis_script_runs(tmp_path, monkeypatch):
    script = ROOT / "analyses" / "sample_correlation.py"
    argv = [str(script), "--quick", "--quiet", "--model", "cnn", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 0
    _check_png(tmp_path / "cnn-sample_correlation.png")


def test_every_family_has_a_script():
    assert {p.stem for p in (ROOT / "analyses").glob("*.py")} >= set(figures_cli.FAMILIES)


def test_trajectory_families_pool_training_runs_of_several_seeds(tmp_path):
    problems = figures_cli._Problems(figures_cli.Settings(quick=True, progress=False, runs=2))
    data = figures_cli.FAMILIES["fngd"](problems, "mlp")
    rows = data.rows("cosines")
    assert data.meta["runs"] == 2 and len(data.meta["finals"]) == 2
    assert {r["run"] for r in rows} == {0, 1}
    first = [r["shared"] for r in rows if r["run"] == 0]
    second = [r["shared"] for r in rows if r["run"] == 1]
    assert len(first) == len(second) and first != second  # another seed, another run
    for family in figures_cli.OVER_RUNS:  # at least three runs by default, more on request
        assert figures_cli.Settings(runs=1).runs_of(family) == 3
        assert figures_cli.Settings(runs=5).runs_of(family) == 5
    _check_png(plots.save_figure(plots.plot(data), tmp_path / "fngd", formats=("png",))[0])


# ------------------------------------------------------------------ other data, larger models
def _fashion_files(folder, n_train=40, size=8):
    from test_datasets import write_mnist_like

    return write_mnist_like(folder, n_train=n_train, n_test=6, size=size)


def test_figure_source_reads_local_files_samples_and_pools(tmp_path):
    arrays = _fashion_files(tmp_path)
    source = an.FigureSource("fashion-mnist", str(tmp_path), samples=30, pool=2)
    full = fl.data.load("fashion-mnist", tmp_path, dtype=torch.float64)
    split = source.load()
    assert split.x_train.dtype == torch.float64 and split.input_shape == (1, 4, 4)
    assert len(split.x_train) == 30 and len(split.y_train) == 30
    # mean of each 2×2 window, by hand
    expected = full.x_train[:30].reshape(30, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(split.x_train, expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(split.y_train.numpy(), arrays["train-labels-idx1-ubyte"][:30])
    assert source.label == "fashion-mnist-n30-pool2-"
    assert an.FigureSource().label == "" and an.FigureSource().is_default
    assert an.FigureSource(size="large").label == "digits-large-"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": "huge"}, "unknown model size 'huge'"),
        ({"data": "imagenet"}, "unknown data set 'imagenet'"),
        ({"pool": 0}, "pool must be a positive integer"),
        ({"samples": -3}, "samples must be a positive integer"),
        ({"samples": True}, "samples must be a positive integer"),
    ],
)
def test_figure_source_refuses_bad_settings(kwargs, message):
    with pytest.raises(fl.FisherlabError, match=message):
        an.FigureSource(**kwargs)


def test_figure_source_refuses_what_the_data_cannot_give(tmp_path):
    _fashion_files(tmp_path)
    with pytest.raises(fl.FisherlabError, match="samples=41 but fashion-mnist has 40"):
        an.FigureSource("fashion-mnist", str(tmp_path), samples=41).load()
    with pytest.raises(fl.FisherlabError, match="pool=3 does not divide"):
        an.FigureSource("fashion-mnist", str(tmp_path), pool=3).load()


@pytest.mark.parametrize("size", ["small", "large"])
def test_figure_models_fit_the_data_and_size(size):
    mlp, text = an.figure_model("mlp", input_shape=(1, 14, 14), size=size)
    widths = an.SIZES[size]["mlp"]
    assert [m.out_features for m in mlp if isinstance(m, torch.nn.Linear)] == [*widths, 10]
    assert mlp[1].in_features == 196 and text.startswith(f"MLP 196-{widths[0]}-")
    cnn, text = an.figure_model("cnn", input_shape=(3, 14, 14), size=size)
    assert cnn(torch.zeros(2, 3, 14, 14)).shape == (2, 10)
    assert cnn[0].in_channels == 3 and cnn[2].out_channels == an.SIZES[size]["cnn"][1]
    with pytest.raises(fl.FisherlabError, match="square images"):
        an.figure_model("cnn", input_shape=(196,))
    # the default is unchanged: the committed figures' models
    assert an.figure_model("mlp")[1] == "MLP 64-32-16-10 (tanh)"


def test_command_on_local_fashion_files(tmp_path, capsys):
    _fashion_files(tmp_path / "data", n_train=80)
    out = tmp_path / "figs"
    argv = ["figures", "--quick", "--quiet", "--model", "cnn", "--out", str(out)]
    argv += ["--data", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--samples", "70"]
    args = _parser().parse_args([*argv, "--pool", "2", "--only", "sample_correlation", "frobenius"])
    assert args.func(args) == 0
    stem = "fashion-mnist-n70-pool2-cnn-sample_correlation"
    _check_png(out / f"{stem}.png")
    meta = json.loads((out / f"{stem}.json").read_text())["meta"]
    assert meta["source"]["data"] == "fashion-mnist" and meta["source"]["pool"] == 2
    assert meta["model"].endswith("on fashion-mnist (70 training images 1×4×4, mean-pooled 2×2)")
    assert (out / "fashion-mnist-n70-pool2-cnn-frobenius.png").exists()
    assert "2 figures in" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--pool", "0"], ["--samples", "-5"], ["--size", "huge"]])
def test_command_refuses_bad_source_arguments(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["figures", *bad])
    assert exit_.value.code == 2


# -------------------------------------------------------------- a user's model from the CLI
USER_MODULE = """
import torch
from torch import nn


def digits_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()


def other_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10)).double()
"""


@pytest.fixture
def user_checkpoints(tmp_path, monkeypatch):
    """A model factory in a temporary module, and two checkpoint files of it (steps 0, 20)."""
    (tmp_path / "fl_test_user_net.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fl_test_user_net

    model = fl_test_user_net.digits_net()
    torch.save(model.state_dict(), tmp_path / "ckpt-0.pt")
    split = fl.data.load_digits(dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(20):
        opt.zero_grad()
        x, y = split.x_train[16 * i : 16 * (i + 1)], split.y_train[16 * i : 16 * (i + 1)]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save({"state_dict": model.state_dict(), "step": 20}, tmp_path / "ckpt-20.pt")
    return tmp_path


def test_figures_and_compare_run_on_a_user_model_and_its_checkpoints(user_checkpoints, capsys):
    from fisherlab.cli import main

    folder = user_checkpoints
    out = folder / "figs"
    argv = [
        "figures", "--model", "fl_test_user_net:digits_net", "--checkpoints",
        str(folder / "ckpt-*.pt"), "--only", "fisher_types", "ekfac_protocol", "block_diagonal",
        "--out", str(out),
        "--samples", "200", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    for family in ("fisher_types", "ekfac_protocol", "block_diagonal"):
        stem = f"digits-n200-fl_test_user_net-digits_net-{family}"
        _check_png(out / f"{stem}.png")
        assert (out / f"{stem}.json").exists()
    data = an.FigureData.load(out, "digits-n200-fl_test_user_net-digits_net-fisher_types")
    assert {r["step"] for r in data.rows("types")} == {0, 20}
    data = an.FigureData.load(out, "digits-n200-fl_test_user_net-digits_net-ekfac_protocol")
    assert {r["step"] for r in data.rows("curves")} == {0, 20}
    assert "ekfac-ra" not in {r["method"] for r in data.rows("curves")}  # no batches to replay
    argv = [
        "compare", "--model", "fl_test_user_net:digits_net", "--checkpoint",
        str(folder / "ckpt-20.pt"), "--samples", "64", "--out", str(out), "--quiet",
        "--methods", "kfac", "ekfac",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "at checkpoint" in printed and "ckpt-20.pt" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "fl_test_user_net:other_net"], "'1.weight' has shape (6, 64)"),
        (["--model", "fl_test_user_net_missing:f"], "does not import"),
        (["--model", "fl_test_user_net:digits_net", "--only", "fngd"], "need a built-in"),
    ],
    ids=["mismatch", "import", "family"],
)
def test_figures_refuse_a_user_model_that_does_not_fit(user_checkpoints, capsys, argv, message):
    from fisherlab.cli import main

    folder = user_checkpoints
    code = main(["figures", *argv, "--checkpoints", str(folder / "ckpt-*.pt"), "--quiet",
                 "--out", str(folder / "bad")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (folder / "bad").exists()  # nothing half-written


def test_compare_refuses_a_checkpoint_that_does_not_fit(user_checkpoints, capsys):
    from fisherlab.cli import main

    folder = user_checkpoints
    code = main(["compare", "--model", "fl_test_user_net:other_net", "--checkpoint",
                 str(folder / "ckpt-0.pt"), "--samples", "16", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and err.count("\n") == 1


# ------------------------------------------------------------------------ claims as code
def test_committed_claims_match_committed_tables():
    """figures/claims.md is what the committed tables give; edit one number and this fails."""
    committed = (ROOT / "figures" / "claims.md").read_text()
    assert an.claims.render_claims(ROOT / "figures", figures_cli.claim_stems()) == committed
    assert committed.count("\n- ") >= 20  # every family's claims, not an empty file


def test_readme_includes_the_committed_claims():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(an.claims.BEGIN)
    end = readme.index(an.claims.END) + len(an.claims.END)
    assert readme[start:end] + "\n" == (ROOT / "figures" / "claims.md").read_text()


def test_a_claim_follows_its_table(tmp_path):
    """Changing one number of a committed table changes the claim read from it."""
    stem = "mlp-block_diagonal"
    data = an.FigureData.load(ROOT / "figures", stem)
    before = an.claims.render_claims(ROOT / "figures", [stem])
    for row in data.rows("errors"):
        if row["layer"] == "network":  # every run's: the claims quote medians
            row["cosine"] = 0.123456
    data.save(tmp_path, stem)
    after = an.claims.render_claims(tmp_path, [stem])
    assert "0.12" in after and after != before
