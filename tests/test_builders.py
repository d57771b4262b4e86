"""Weighted block builders, the blocks' inverse/eigen API and the Kronecker-eigenbasis kernel.

A builder's ``add(stats, old_weight, new_weight)`` is one call for a sum over a data set
(weights ``(1, 1)``: the engine's blocks, bit for bit) and for a running average (``(0, 1)``
then ``(decay, 1 − decay)`` over per-batch estimates: the optimizers' running averages).
"""

import functools
import io

import pytest
import torch
from cases import CASES
from helpers import EXACT, rel_err

import fisherlab as fl
from fisherlab.blocks import build, parse_method, parse_options
from fisherlab.blocks.assemble import block_class
from fisherlab.blocks.base import BuildContext, LayerStats
from fisherlab.blocks.factors import gradient_factor, input_factor
from fisherlab.blocks.kronecker import KroneckerEigenbasis, factored_shifts
from fisherlab.blocks.skfac import skfac_rows
from fisherlab.capture import captures

#: A running average against the optimizers' ``lerp`` (another rounding of the same sums).
AVERAGE = 1e-12
DECAY = 0.7
SIZES = (7, 7, 3)  # a short last batch: per-batch normalisation matters

BY_NAME = {c.name: c for c in CASES}
#: Cross-entropy with a bias, a summed loss (ν = 1 for every batch and the data), a convolution.
CASE_NAMES = ["mlp-tanh-bias-ce", "mlp-tanh-sum-mse", "cnn-stride-pad-ce"]
SPECS = [
    "exact",
    "kfac",
    "kfac:kfac_approx=reduce",
    "ekfac",
    "woodbury",
    "woodbury:conv_gram=reduce_sum",
    "skfac",
    "skfac:conv_reduction=subsample,spatial_samples=2,seed=3",
    "diag",
]


@functools.cache
def _problem(case_name, fisher_type="true"):
    """The problem and its batches' captures (shared: builders never write into captures)."""
    model, loss_fn, x, y = BY_NAME[case_name].build(sum(SIZES))
    batches, start = [], 0
    for size in SIZES:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    problem = fl.Problem(model, loss_fn, batches, fisher_type=fisher_type)
    return problem, list(captures(problem, quiet=True))


def _builder(spec, layer, normalise="data", fisher_type="true", **extra):
    method, options = parse_method(spec)
    options = parse_options(method, {**options, **extra})
    return block_class(method, layer).Builder(layer, options, BuildContext(fisher_type), normalise)


def _fill(builder, caps, name, normaliser):
    """A data set's sum: weights (1, 1), every pass the builder needs."""
    for _ in range(builder.passes):
        for cap in caps:
            builder.add(LayerStats.of(cap, name))
        builder.end_pass(normaliser)


# ------------------------------------------------------------------------- sums over data sets
@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("spec", SPECS)
def test_a_builder_with_unit_weights_is_the_data_sets_block_bit_for_bit(case_name, spec):
    problem, caps = _problem(case_name)
    method, options = parse_method(spec)
    expected = fl.curvature(method, problem, **options)
    for name, reference in expected.items():
        builder = _builder(spec, caps[0][name].layer)
        _fill(builder, caps, name, problem.normaliser)
        first = builder.block(problem.normaliser).to_dense()
        assert torch.equal(first, reference.to_dense()), name
        assert torch.equal(builder.block(problem.normaliser).to_dense(), first)  # repeatable
        assert torch.equal(builder.finish(problem.normaliser, 17).to_dense(), first)


# --------------------------------------------------------------------------- running averages
def _average(values):
    """The optimizers' former running average: set on first use, then ``lerp`` with ``DECAY``."""
    average = None
    for value in values:
        average = value.clone() if average is None else torch.lerp(value, average, DECAY)
    return average


def _weights(k):
    """The optimizers' schedule: the first estimate as it is, then ``(decay, 1 − decay)``."""
    return (0.0, 1.0) if k == 0 else (DECAY, 1 - DECAY)


def _run_average(builder, caps, name):
    for k, cap in enumerate(caps):
        builder.add(LayerStats.of(cap, name), *_weights(k))


@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_running_average_is_the_optimizers_average_of_batch_factors(case_name, approx):
    _, caps = _problem(case_name)
    for name in caps[0]:
        builder = _builder(f"kfac:kfac_approx={approx}", caps[0][name].layer, "batch")
        _run_average(builder, caps, name)
        gamma = _average(gradient_factor(c[name].G, c.normaliser, approx) for c in caps)
        omega = _average(input_factor(c[name].A, approx) for c in caps)
        block = builder.block()
        assert rel_err(block.gamma, gamma) <= AVERAGE and rel_err(block.omega, omega) <= AVERAGE
        assert rel_err(block.to_dense(), _kron_dense(block.layer, gamma, omega)) <= AVERAGE


def _kron_dense(layer, gamma, omega):
    index = layer.kron_to_param_index()
    return torch.kron(gamma, omega)[index][:, index]


@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("spec", ["exact", "diag", "woodbury"])
def test_running_averages_of_linear_blocks_are_averages_of_batch_blocks(case_name, spec):
    _, caps = _problem(case_name)
    for name in caps[0]:
        builder = _builder(spec, caps[0][name].layer, "batch")
        _run_average(builder, caps, name)
        by_hand = _average(build(spec, c, names=[name])[name].to_dense() for c in caps)
        assert rel_err(builder.block().to_dense(), by_hand) <= AVERAGE, name


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_skfac_running_average_weights_the_factors_grams(case_name):
    _, caps = _problem(case_name)
    for name in caps[0]:
        builder = _builder("skfac", caps[0][name].layer, "batch")
        _run_average(builder, caps, name)
        batch = [build("skfac", c, names=[name])[name].factors() for c in caps]
        gamma, omega = builder.block().factors()
        assert rel_err(gamma, _average(g for g, _ in batch)) <= AVERAGE
        assert rel_err(omega, _average(o for _, o in batch)) <= AVERAGE


@functools.cache
def _equal_batches(case_name, count=4, size=6):
    """Captures of ``count`` batches of one size (the rows averaged must have one shape)."""
    model, loss_fn, x, y = BY_NAME[case_name].build(count * size)
    batches = [(x[k * size : (k + 1) * size], y[k * size : (k + 1) * size]) for k in range(count)]
    problem = fl.Problem(model, loss_fn, batches, fisher_type="empirical")
    return list(captures(problem, quiet=True))


ROW_SPECS = {
    "sum": "skfac:average=rows",
    "subsample": "skfac:average=rows,conv_reduction=subsample,spatial_samples=3,seed=5",
}


@pytest.mark.parametrize("case_name", CASE_NAMES)
@pytest.mark.parametrize("reduction", list(ROW_SPECS))
def test_skfac_row_average_is_the_moving_average_of_the_raw_rows(case_name, reduction):
    """``average="rows"`` with the optimizers' weights against the former SKFAC optimizer's
    recursion, written out: ``X ← lerp(X_b, X, decay)`` on the raw rows (set on first use),
    ``Γ = YᵀY/ν``, ``Ω = XᵀX/S``, and the block's dense ``Γ ⊗ Ω``."""
    caps = _equal_batches(case_name)
    spec = ROW_SPECS[reduction]
    options = parse_options("skfac", parse_method(spec)[1])
    for name in caps[0]:
        builder = _builder(spec, caps[0][name].layer, "batch", fisher_type="empirical")
        generator = torch.Generator().manual_seed(options.seed)
        rows_x = rows_y = None
        for k, cap in enumerate(caps):
            builder.add(LayerStats.of(cap, name), *_weights(k))
            X, Y = skfac_rows(
                cap[name].A, cap[name].G, options.conv_reduction, options.spatial_samples,
                generator,
            )  # fmt: skip
            rows_x = X.clone() if rows_x is None else torch.lerp(X, rows_x, DECAY)
            rows_y = Y.clone() if rows_y is None else torch.lerp(Y, rows_y, DECAY)
        gamma = rows_y.T @ rows_y / caps[-1].normaliser
        omega = rows_x.T @ rows_x / rows_x.shape[0]
        block = builder.block()
        got_gamma, got_omega = block.factors()
        assert rel_err(got_gamma, gamma) <= AVERAGE, name
        assert rel_err(got_omega, omega) <= AVERAGE, name
        assert rel_err(block.to_dense(), _kron_dense(block.layer, gamma, omega)) <= AVERAGE
        assert builder.state_dict()["mass"] == 1.0  # exactly: (0, 1), then (d, 1 - d)


def test_skfac_row_average_from_the_start_is_bias_corrected():
    """Weights ``(decay, 1 − decay)`` from the first call: the rows' weighted mean ``X̄/W``."""
    caps = _equal_batches("mlp-tanh-bias-ce")
    name = "2"
    builder = _builder("skfac:average=rows", caps[0][name].layer, "batch", "empirical")
    weights, rows = [], []
    for cap in caps:
        builder.add(LayerStats.of(cap, name), DECAY, 1 - DECAY)
        weights = [w * DECAY for w in weights] + [1 - DECAY]
        X, Y = skfac_rows(cap[name].A, cap[name].G, "sum", None, 0)
        rows.append((X / X.shape[0] ** 0.5, Y / cap.normaliser**0.5))
    mean_x = sum(w * x for w, (x, _) in zip(weights, rows)) / sum(weights)
    mean_y = sum(w * y for w, (_, y) in zip(weights, rows)) / sum(weights)
    gamma, omega = builder.block().factors()
    assert rel_err(gamma, mean_y.T @ mean_y) <= AVERAGE
    assert rel_err(omega, mean_x.T @ mean_x) <= AVERAGE


def test_skfac_row_average_needs_rows_of_one_shape_and_restarts_on_zero_old_weight():
    _, caps = _problem("mlp-tanh-bias-ce")  # batches of 7, 7 and 3 samples
    name = "0"
    builder = _builder("skfac:average=rows", caps[0][name].layer, "batch")
    first, short = LayerStats.of(caps[1], name), LayerStats.of(caps[2], name)
    assert not builder.rows_fit(first)  # nothing held
    builder.add(LayerStats.of(caps[0], name), 0.0, 1.0)
    assert builder.rows_fit(first) and not builder.rows_fit(short)
    with pytest.raises(fl.FisherlabError, match=r"averages rows .* the batch gives 3 rows"):
        builder.add(short, DECAY, 1 - DECAY)
    builder.add(short, 0.0, 1.0)  # a new average: the short batch's own rows
    alone = _builder("skfac:average=rows", caps[0][name].layer, "batch")
    alone.add(short, 0.0, 1.0)
    assert torch.equal(builder.block().to_dense(), alone.block().to_dense())


def test_skfac_row_average_is_refused_over_a_data_set():
    _, caps = _problem("mlp-tanh-bias-ce")
    with pytest.raises(fl.FisherlabError, match=r"average='rows' .* needs normalise='batch'"):
        _builder("skfac:average=rows", caps[0]["0"].layer, "data")


def test_skfac_row_average_state_round_trips_and_keeps_its_mode():
    caps = _equal_batches("cnn-stride-pad-ce")
    spec = ROW_SPECS["subsample"]
    for name in caps[0]:
        layer = caps[0][name].layer
        builder = _builder(spec, layer, "batch", "empirical")
        for k, cap in enumerate(caps[:2]):
            builder.add(LayerStats.of(cap, name), *_weights(k))
        buffer = io.BytesIO()
        torch.save(builder.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        restored = _builder(spec, layer, "batch", "empirical")
        restored.load_state_dict(state)
        for b in (builder, restored):
            b.add(LayerStats.of(caps[2], name), *_weights(1))
        assert torch.equal(restored.block().to_dense(), builder.block().to_dense()), name
        with pytest.raises(fl.FisherlabError, match=r"saved with average='rows', this builder"):
            _builder("skfac", layer, "batch", "empirical").load_state_dict(state)


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_ekfac_ra_scalings_are_the_average_of_batch_scalings_in_a_fixed_basis(case_name):
    problem, caps = _problem(case_name)
    basis = fl.curvature("ekfac", problem)
    for name in caps[0]:
        builder = _builder("ekfac", caps[0][name].layer, "batch", basis=basis)
        _run_average(builder, caps, name)
        batch = [build("ekfac", c, names=[name], basis=basis)[name].scalings for c in caps]
        block = builder.block()
        assert rel_err(block.scalings, _average(batch)) <= AVERAGE
        assert torch.equal(block.u_gamma, basis[name].u_gamma)


@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_ekfac_builder_holds_kfacs_factors_and_its_own_scalings(case_name):
    """An optimizer's schedule: factors every step, a new basis, the scalings after it."""
    _, caps = _problem(case_name)
    for name in caps[0]:
        layer = caps[0][name].layer
        ekfac, kfac = _builder("ekfac", layer, "batch"), _builder("kfac", layer, "batch")
        for k, cap in enumerate(caps):
            ekfac.add_factors(LayerStats.of(cap, name), *_weights(k))
            kfac.add(LayerStats.of(cap, name), *_weights(k))
        ekfac.update_basis()
        kron = kfac.block()
        basis = kron.eigenbasis()
        assert torch.equal(ekfac.basis[0], basis.u_gamma)
        assert torch.equal(ekfac.basis[1], basis.u_omega)
        for k, cap in enumerate(caps):  # scalings restart in the new basis
            ekfac.add_scalings(LayerStats.of(cap, name), *_weights(k))
        batch = [
            build("ekfac", c, names=[name], basis={name: ekfac.basis})[name].scalings for c in caps
        ]
        assert rel_err(ekfac.block().scalings, _average(batch)) <= AVERAGE


def test_running_average_from_the_start_is_bias_corrected():
    _, caps = _problem("mlp-tanh-bias-ce")
    name = "0"
    builder = _builder("diag", caps[0][name].layer, "batch")
    for cap in caps:
        builder.add(LayerStats.of(cap, name), DECAY, 1 - DECAY)
    weights = [(1 - DECAY) * DECAY ** (len(caps) - 1 - k) for k in range(len(caps))]
    diagonals = [build("diag", c, names=[name])[name].diagonal for c in caps]
    expected = sum(w * d for w, d in zip(weights, diagonals)) / sum(weights)
    assert rel_err(builder.block().diagonal, expected) <= AVERAGE


def test_unit_weights_per_batch_are_the_mean_of_batch_estimates():
    _, caps = _problem("mlp-tanh-sum-mse")
    name = "2"
    builder = _builder("exact", caps[0][name].layer, "batch")
    for cap in caps:
        builder.add(LayerStats.of(cap, name))
    expected = sum(build("exact", c, names=[name])[name].to_dense() for c in caps) / len(caps)
    assert rel_err(builder.block().to_dense(), expected) <= AVERAGE


@pytest.mark.parametrize("spec", ["kfac", "exact", "diag", "woodbury", "skfac"])
def test_weighted_sums_over_a_data_set(spec):
    """``normalise="data"`` with weights: ``Σ_k w_k (batch sums) / ν`` (``Ω`` by its count)."""
    problem, caps = _problem("cnn-stride-pad-ce")
    weights = [(1.0, 2.0), (0.5, 1.0), (3.0, 0.25)]
    w = [2.0 * 0.5 * 3.0, 1.0 * 3.0, 0.25]  # w_k = β_k Π_{j>k} α_j
    for name in caps[0]:
        builder = _builder(spec, caps[0][name].layer)
        for cap, (old, new) in zip(caps, weights):
            builder.add(LayerStats.of(cap, name), old, new)
        block = builder.block(problem.normaliser)
        singles = [build(spec, c, names=[name])[name] for c in caps]
        if spec in ("kfac", "skfac"):
            f = [s.factors() if spec == "skfac" else (s.gamma, s.omega) for s in singles]
            counts = [
                c[name].A.shape[0] * (c[name].A.shape[1] if spec == "kfac" else 1) for c in caps
            ]
            gamma = sum(wk * g * c.normaliser for wk, (g, _), c in zip(w, f, caps))
            omega = sum(wk * o * n for wk, (_, o), n in zip(w, f, counts)) / sum(
                wk * n for wk, n in zip(w, counts)
            )
            got = block.factors() if spec == "skfac" else (block.gamma, block.omega)
            assert rel_err(got[0], gamma / problem.normaliser) <= AVERAGE
            assert rel_err(got[1], omega) <= AVERAGE
        else:
            expected = sum(wk * s.to_dense() * c.normaliser for wk, s, c in zip(w, singles, caps))
            assert rel_err(block.to_dense(), expected / problem.normaliser) <= AVERAGE


# ------------------------------------------------------------------------------ state
@pytest.mark.parametrize("normalise", ["data", "batch"])
@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trips_through_torch_save(spec, normalise):
    problem, caps = _problem("cnn-stride-pad-ce")
    normaliser = problem.normaliser if normalise == "data" else None
    for name in caps[0]:
        layer = caps[0][name].layer
        builder = _builder(spec, layer, normalise)
        if builder.passes > 1:  # EKFAC: the basis after a first pass over the data
            for cap in caps:
                builder.add(LayerStats.of(cap, name))
            builder.end_pass(normaliser)
        builder.add(LayerStats.of(caps[0], name))
        builder.add(LayerStats.of(caps[1], name), 0.5, 0.5)
        buffer = io.BytesIO()
        torch.save(builder.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        restored = _builder(spec, layer, normalise)
        restored.load_state_dict(state)
        for b in (builder, restored):
            b.add(LayerStats.of(caps[2], name), 0.5, 0.5)
        assert torch.equal(
            restored.block(normaliser).to_dense(), builder.block(normaliser).to_dense()
        ), name


# ------------------------------------------------------------------ block inverse / eigen API
def _kfac_block(case_name="mlp-tanh-bias-ce", name="0", **options):
    problem, _ = _problem(case_name)
    return fl.curvature("kfac", problem, **options)[name]


def test_kfac_eigenbasis_reconstructs_its_factors_and_is_kept():
    block = _kfac_block()
    basis = block.eigenbasis()
    assert basis is block.eigenbasis()
    for (values, vectors), factor in (
        (basis.eig_gamma, block.gamma),
        (basis.eig_omega, block.omega),
    ):
        assert rel_err(vectors @ torch.diag(values) @ vectors.T, factor) <= EXACT
        assert rel_err(vectors.T @ vectors, torch.eye(len(factor), dtype=factor.dtype)) <= EXACT


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_inverse_factors_are_the_dense_inverses_of_the_shifted_factors(damping):
    block = _kfac_block(damping_mode="factored")
    gamma, omega = block.gamma, block.omega
    d_out, d = len(gamma), len(omega)
    pi = ((omega.trace() / d) / (gamma.trace() / d_out)).sqrt()
    shift_g, shift_o = damping**0.5 / pi, pi * damping**0.5
    inverse_g, inverse_o = block.inverse_factors(damping)
    eye = torch.eye
    assert (
        rel_err(inverse_g, torch.linalg.inv(gamma + shift_g * eye(d_out, dtype=gamma.dtype)))
        <= EXACT
    )
    assert (
        rel_err(inverse_o, torch.linalg.inv(omega + shift_o * eye(d, dtype=omega.dtype))) <= EXACT
    )
    assert block.inverse_factors(damping)[0] is inverse_g  # kept per λ
    assert float(shift_g * shift_o) == pytest.approx(damping, rel=1e-14)
    v = torch.randn(block.size, 2, dtype=torch.float64)
    dense = _kron_dense(block.layer, inverse_g, inverse_o)
    assert rel_err(block.solve(v, damping), dense @ v) <= EXACT


def test_factored_shifts_multiply_to_the_damping_and_fall_back_to_pi_one():
    sg, so = factored_shifts(torch.tensor(4.0), torch.tensor(1.0), 0.09)
    assert float(sg) == pytest.approx(0.3 * 2) and float(so) == pytest.approx(0.3 / 2)
    sg, so = factored_shifts(0.0, 1.0, 0.09)  # Γ = 0: π = 1
    assert float(sg) == float(so) == pytest.approx(0.3)


def test_ekfac_is_kfacs_basis_plus_its_own_scalings():
    problem, _ = _problem("mlp-tanh-bias-ce")
    kfac, ekfac = fl.curvature("kfac", problem), fl.curvature("ekfac", problem)
    for name, block in ekfac.items():
        basis = kfac[name].eigenbasis()
        assert torch.equal(block.eigenbasis().u_gamma, basis.u_gamma)
        assert torch.equal(block.eigenbasis().u_omega, basis.u_omega)


def test_skfac_low_rank_eigenbasis_reconstructs_its_factors():
    block = build("skfac", fl.capture(*BY_NAME["mlp-tanh-bias-ce"].build(2)))["2"]
    basis = block.eigenbasis()
    assert not basis.complete  # 2 samples < d: low rank
    gamma, omega = block.factors()
    for (values, vectors), factor in ((basis.eig_gamma, gamma), (basis.eig_omega, omega)):
        assert rel_err(vectors @ torch.diag(values) @ vectors.T, factor) <= EXACT


# --------------------------------------------------------------------------- the kernel
def _orthonormal(d, k, seed):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    return q[:, :k]


@pytest.mark.parametrize("ranks", [(4, 5), (2, 3)], ids=["complete", "low-rank"])
def test_kernel_equals_the_dense_kronecker_products(ranks):
    d_out, d = 4, 5
    ug, uo = _orthonormal(d_out, ranks[0], 1), _orthonormal(d, ranks[1], 2)
    lg = torch.rand(ranks[0], dtype=torch.float64) + 0.1
    lo = torch.rand(ranks[1], dtype=torch.float64) + 0.1
    basis = KroneckerEigenbasis(ug, uo, lg, lo)
    q = torch.kron(ug, uo)  # vec_r order
    w = torch.randn(*ranks, dtype=torch.float64)
    V = torch.randn(3, d_out, d, dtype=torch.float64)
    flat = V.reshape(3, -1).T
    dense = q @ torch.diag(w.flatten()) @ q.T
    assert rel_err(basis.apply(V, w).reshape(3, -1).T, dense @ flat) <= EXACT
    factor = q @ torch.diag(torch.outer(lg, lo).flatten()) @ q.T  # Γ ⊗ Ω on its span
    solve = torch.linalg.solve(factor + 0.01 * torch.eye(d_out * d, dtype=torch.float64), flat)
    assert rel_err(basis.damped_solve(V, 0.01).reshape(3, -1).T, solve) <= EXACT
    assert rel_err(basis.eigvalsh(), torch.linalg.eigvalsh(factor)) <= EXACT


def _factored_dense(block):
    """``(Γ + √λ/π I)⁻¹ ⊗ (Ω + π√λ I)⁻¹`` densely, in parameter order (λ = 0.01)."""
    gamma, omega = block.factors() if block.method == "skfac" else (block.gamma, block.omega)
    shifts = factored_shifts(gamma.trace() / len(gamma), omega.trace() / len(omega), 0.01)
    inverse_g, inverse_o = (
        torch.linalg.inv(f + s * torch.eye(len(f), dtype=f.dtype))
        for f, s in zip((gamma, omega), shifts)
    )
    return _kron_dense(block.layer, inverse_g, inverse_o)


@pytest.mark.parametrize("case_name", ["cnn-stride-pad-ce", "mlp-tanh-bias-ce"])
@pytest.mark.parametrize("spec", ["kfac", "ekfac", "skfac"])
def test_the_three_kronecker_blocks_solve_through_the_kernel(case_name, spec, monkeypatch):
    problem, _ = _problem(case_name)
    curv = fl.curvature(spec, problem)
    expected = {}
    for name, block in curv.items():
        dense = block.to_dense()
        v = torch.randn(block.size, 2, dtype=torch.float64)
        eye = torch.eye(block.size, dtype=dense.dtype)
        expected[name] = (v, torch.linalg.solve(dense + 0.01 * eye, v))
    calls = []
    original = KroneckerEigenbasis.apply
    monkeypatch.setattr(
        KroneckerEigenbasis, "apply", lambda self, *a: calls.append(1) or original(self, *a)
    )
    for name, block in curv.items():
        v, reference = expected[name]
        assert rel_err(block.solve(v, 0.01), reference) <= EXACT, name
    assert len(calls) == len(curv)


@pytest.mark.parametrize("case_name", ["cnn-stride-pad-ce", "mlp-tanh-bias-ce"])
@pytest.mark.parametrize("spec", ["kfac", "skfac"])
def test_factored_damping_solves_equal_the_dense_factored_inverse(case_name, spec):
    problem, _ = _problem(case_name)
    for block in fl.curvature(spec, problem, damping_mode="factored").values():
        v = torch.randn(block.size, 2, dtype=torch.float64)
        assert rel_err(block.solve(v, 0.01), _factored_dense(block) @ v) <= EXACT


def test_fisherlab_blocks_builder_makes_a_layers_builder_by_the_table():
    _, caps = _problem("cnn-stride-pad-ce")
    for name in caps[0]:
        layer = caps[0][name].layer
        made = fl.blocks.builder("kfac", layer, "true", normalise="batch", kfac_approx="reduce")
        by_hand = _builder("kfac:kfac_approx=reduce", layer, "batch")
        for b in (made, by_hand):
            _run_average(b, caps, name)
        assert torch.equal(made.block().to_dense(), by_hand.block().to_dense())
    with pytest.raises(fl.FisherlabError, match="unknown method"):
        fl.blocks.builder("kfca", layer, "true")
    with pytest.raises(fl.FisherlabError, match="unknown option"):
        fl.blocks.builder("kfac", layer, "true", kfac_aprox="reduce")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("old", "new"), [(-0.1, 1.0), (1.0, float("nan")), (float("inf"), 1.0), ("1", 1.0)]
)
def test_bad_weights_are_refused(old, new):
    _, caps = _problem("mlp-tanh-bias-ce")
    builder = _builder("kfac", caps[0]["0"].layer)
    with pytest.raises(fl.FisherlabError, match="_weight must lie in"):
        builder.add(LayerStats.of(caps[0], "0"), old, new)


def test_misuse_of_builders_is_a_clear_error():
    _, caps = _problem("mlp-tanh-bias-ce")
    layer = caps[0]["0"].layer
    stats = LayerStats.of(caps[0], "0")
    with pytest.raises(fl.FisherlabError, match="no statistics yet"):
        _builder("diag", layer).block(1.0)
    summed = _builder("diag", layer)
    summed.add(stats)
    with pytest.raises(fl.FisherlabError, match="pass the data's ν"):
        summed.block()
    averaged = _builder("diag", layer, "batch")
    averaged.add(stats)
    with pytest.raises(fl.FisherlabError, match="takes no normaliser"):
        averaged.block(7.0)
    with pytest.raises(fl.FisherlabError, match="has no basis yet"):
        _builder("ekfac", layer).add_scalings(stats)
    with pytest.raises(fl.FisherlabError, match="normalise='average'"):
        _builder("diag", layer, "average")
    with pytest.raises(fl.FisherlabError, match="unknown entries"):
        summed.load_state_dict({"nonsense": torch.zeros(1)})
    with pytest.raises(fl.FisherlabError, match="saved with normalise='batch'"):
        summed.load_state_dict(averaged.state_dict())
    other = _builder("diag", caps[0]["2"].layer)
    with pytest.raises(fl.FisherlabError, match="has shape"):
        other.load_state_dict(summed.state_dict())
