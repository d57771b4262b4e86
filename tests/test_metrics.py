"""Metrics: at-scale Frobenius formulas equal dense ones; spectra, directions, correlations."""

import math

import pytest
import torch
from cases import CASE_IDS, CASES
from helpers import EXACT, rel_err
from torch import nn

import fisherlab as fl
from fisherlab import metrics
from fisherlab.blocks import build, parse_method
from fisherlab.comparison import batch_gradients

AT_SCALE = [
    "kfac",
    "kfac:kfac_approx=reduce",
    "ekfac",
    "skfac",
    "skfac:conv_reduction=subsample,spatial_samples=2",
    "diag",
    "woodbury",
    "woodbury:conv_gram=reduce_sum",
]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", AT_SCALE)
def test_frobenius_at_scale_equals_dense(case, spec, fisher_type):
    model, loss_fn, x, y = case.build(4)
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    method, options = parse_method(spec)
    approx, exact = build(method, cap, **options), build("exact", cap)
    for name, layer in cap.items():
        f = exact[name].to_dense()
        error, norm = metrics.frobenius_at_scale(approx[name], layer, cap.normaliser)
        assert norm == pytest.approx(torch.linalg.matrix_norm(f).item(), rel=1e-12)
        dense_error = torch.linalg.matrix_norm(f - approx[name].to_dense()).item()
        # squared errors agree to rounding of ‖F‖² (cancellation is in the squares)
        assert error**2 == pytest.approx(dense_error**2, abs=1e-11 * norm**2), name


def test_frobenius_error_relative_and_absolute():
    a, b = torch.eye(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    assert metrics.frobenius_error(a, b) == 1.0
    assert metrics.frobenius_error(a, b, relative=False) == pytest.approx(math.sqrt(3))


def test_spectrum_dense_structured_and_lanczos_agree():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x, y = torch.randn(16, 20, dtype=torch.float64), torch.randint(0, 3, (16,))
    exact = fl.curvature("exact", model, nn.CrossEntropyLoss(), x, y)["0"]
    woodbury = fl.curvature("woodbury", model, nn.CrossEntropyLoss(), x, y)["0"]
    dense = metrics.spectrum(exact.to_dense())
    assert rel_err(metrics.spectrum(woodbury), dense) <= 1e-9
    lanczos = metrics.spectrum(exact, k=5, dense_limit=10)
    assert rel_err(lanczos, dense[:5]) <= 1e-8
    assert metrics.spectrum_distance(dense, dense) == 0.0
    assert metrics.spectrum_distance(dense, 2 * dense) == pytest.approx(1.0)


def test_direction_quality_is_perfect_for_the_exact_block_and_sane_for_kfac():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y)
    exact, kfac = build("woodbury", cap), build("kfac", cap)
    g = batch_gradients(fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical"))
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    expected = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad])
    assert rel_err(g["0"], expected) <= EXACT
    same = metrics.direction_quality(exact["0"], exact["0"], g["0"], 1e-3)
    assert same.relative_error == 0.0 and same.cosine == pytest.approx(1.0)
    approx = metrics.direction_quality(kfac["0"], exact["0"], g["0"], 1e-3)
    assert -1.0 <= approx.cosine < 1.0 and approx.relative_error > 0


def test_sample_correlation_has_unit_diagonal_and_matches_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    for layer in cap.values():
        c = metrics.sample_correlation(layer)
        assert c.shape == (6, 6) and torch.allclose(
            c.diagonal(), torch.ones(6, dtype=torch.float64)
        )
        g = layer.jacobian_rows()[0]
        g = g / g.norm(dim=1, keepdim=True)
        assert rel_err(c, g @ g.T) <= EXACT


def test_kfe_correlation_decorrelates_and_has_unit_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y)
    exact, ekfac = build("exact", cap)["0"], build("ekfac", cap)["0"]
    corr = metrics.kfe_correlation(exact.matrix, ekfac)
    for c in (corr.parameter_basis, corr.kfe):
        assert torch.allclose(c.diagonal(), torch.ones(25, dtype=torch.float64))
    assert corr.off_diagonal(corr.kfe) < corr.off_diagonal(corr.parameter_basis)
    assert metrics.kfe_correlation(exact.matrix, ekfac, coordinates=7).kfe.shape == (7, 7)


# ------------------------------------------------------------------------------ controls
def _psd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(rank, n, generator=g, dtype=torch.float64)
    return j.T @ j / rank


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0], ids=["shrunk", "same", "grown"])
def test_scale_controls_equal_a_dense_scan_and_the_closed_forms(scale):
    f, f_hat = _psd(6, 4, 0), scale * _psd(6, 3, 1)
    c = metrics.scale_controls(f, f_hat)
    norm = float(torch.linalg.matrix_norm(f))

    def rel(a: float) -> float:
        return float(torch.linalg.matrix_norm(f - a * f_hat)) / norm

    assert c.relative == pytest.approx(rel(1.0), rel=1e-10)
    # α* minimises ‖F − αF̂‖: no α on a fine grid around it does better, and it is ⟨F,F̂⟩/‖F̂‖²
    assert c.optimal_scalar == pytest.approx(float((f * f_hat).sum() / (f_hat**2).sum()), rel=1e-12)
    grid = c.optimal_scalar * torch.linspace(0.5, 1.5, 2001, dtype=torch.float64)
    scan = min(rel(float(a)) for a in grid)
    assert c.scaled == pytest.approx(rel(c.optimal_scalar), rel=1e-8)
    assert c.scaled <= scan + 1e-12 and scan - c.scaled < 1e-6
    assert c.scaled <= min(1.0, c.relative) + 1e-12  # α = 0 and α = 1 are candidates
    tau = float(f.trace() / f_hat.trace())
    assert c.trace_ratio == pytest.approx(tau, rel=1e-12)
    assert c.trace_matched == pytest.approx(rel(tau), rel=1e-8)


def test_scale_controls_cancel_a_pure_scale_error():
    f = _psd(5, 7, 2)
    c = metrics.scale_controls(f, 0.02 * f)
    assert c.relative == pytest.approx(0.98, rel=1e-12)
    assert c.scaled < 1e-7 and c.trace_matched < 1e-7
    assert c.optimal_scalar == pytest.approx(50.0, rel=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 1e-1, 10.0], ids=["small", "mid", "large"])
def test_whitened_inverse_error_equals_the_dense_matrix_square_root(damping):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    f, f_hat = _psd(6, 3, 3), _psd(6, 6, 4)
    eye = torch.eye(6, dtype=torch.float64)
    root = torch.from_numpy(scipy_linalg.sqrtm((f + damping * eye).numpy()).real)
    m = root @ torch.linalg.inv(f_hat + damping * eye) @ root
    expected = float(torch.linalg.matrix_norm(m - eye)) / math.sqrt(6)
    assert metrics.whitened_inverse_error(f, f_hat, damping) == pytest.approx(expected, rel=1e-8)
    # exact for F̂ = F; the I/λ baseline (F̂ = 0) pays ‖F‖/(λ√P) and is not rewarded
    assert metrics.whitened_inverse_error(f, f, damping) < 1e-10
    zero = metrics.whitened_inverse_error(f, torch.zeros_like(f), damping)
    assert zero == pytest.approx(float(torch.linalg.matrix_norm(f)) / damping / math.sqrt(6))


def test_whitened_inverse_error_refuses_zero_damping():
    with pytest.raises(fl.FisherlabError, match="damping"):
        metrics.whitened_inverse_error(_psd(3, 3, 0), _psd(3, 3, 1), 0.0)


@pytest.mark.parametrize(
    ("norms", "expected"),
    [([1.0, 1.0, 1.0, 1.0], 4.0), ([5.0, 0.0, 0.0], 1.0), ([3.0, 1.0], 16.0 / 10.0)],
    ids=["equal", "one", "uneven"],
)
def test_effective_sample_count(norms, expected):
    assert metrics.effective_sample_count(torch.tensor(norms)) == pytest.approx(expected)
