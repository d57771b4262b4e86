"""Curvature blocks: one interface, consistent with their own dense form and the exact Fisher."""

import math

import pytest
import torch
from helpers import EXACT, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fisherlab as fl
from fisherlab.blocks import build
from fisherlab.blocks.kfac import factored_pi

DAMPING = 1e-2


def _frob(a):
    return torch.linalg.matrix_norm(a).item()


def _damped_solve(dense, v, damping):
    return torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype), v)


@pytest.mark.parametrize("method", fl.METHODS)
def test_matvec_solve_eigvalsh_agree_with_own_dense(case, method, fisher_type):
    model, loss_fn, x, y = case.build(5)
    curv = fl.curvature(method, model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    assert curv.method == method and curv.fisher_type == fisher_type
    for block in curv.values():
        dense = block.to_dense()
        assert dense.shape == (block.size, block.size) and torch.allclose(
            dense, dense.T, atol=1e-14
        )
        v = torch.randn(block.size, 3, dtype=torch.float64)
        assert rel_err(block.matvec(v), dense @ v) <= EXACT
        assert rel_err(block.matvec(v[:, 0]), dense @ v[:, 0]) <= EXACT
        assert rel_err(block.solve(v, DAMPING), _damped_solve(dense, v, DAMPING)) <= EXACT
        assert rel_err(block.eigvalsh(), torch.linalg.eigvalsh(dense)) <= EXACT
        op = block.as_linear_operator()
        assert rel_err(torch.as_tensor(op @ v[:, 0].numpy()), dense @ v[:, 0]) <= EXACT
        assert block.nbytes > 0


def test_woodbury_and_exact_blocks_equal_the_foundations_exact_blocks(case, fisher_type):
    model, loss_fn, x, y = case.build(5)
    results = {}
    for method in ("woodbury", "exact"):
        torch.manual_seed(4)
        results[method] = fl.curvature(
            method, model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2
        )
    torch.manual_seed(4)
    reference = fl.exact_blocks(
        model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2, backend="torch.func"
    )
    for name, block in reference.items():
        assert rel_err(results["woodbury"][name].to_dense(), block) <= EXACT
        assert rel_err(results["exact"][name].to_dense(), block) <= EXACT


def test_ekfac_is_never_worse_than_kfac_on_the_zoo(case, fisher_type, batch_size):
    model, loss_fn, x, y = case.build(batch_size)
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    exact, kfac, ekfac = (build(m, cap) for m in ("exact", "kfac", "ekfac"))
    for name in cap:
        f = exact[name].to_dense()
        err_k, err_e = _frob(f - kfac[name].to_dense()), _frob(f - ekfac[name].to_dense())
        assert err_e <= err_k + EXACT * _frob(f), name
        # the projection identity ‖F − F̂_ekfac‖² = ‖F‖² − ‖s‖²
        s = ekfac[name].scalings
        identity = _frob(f) ** 2 - (s**2).sum().item()
        assert err_e**2 == pytest.approx(identity, abs=EXACT * _frob(f) ** 2)


# ------------------------------------------------------------------ property tests (hypothesis)
def _linear_problem(d_in, d_out, hidden, n, bias, seed, loss):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, d_out, bias=bias)
    ).double()
    x = torch.randn(n, d_in, dtype=torch.float64)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, d_out, (n,))
    return model, nn.MSELoss(), x, torch.randn(n, d_out, dtype=torch.float64)


def _conv_problem(c_in, c_out, kernel, stride, padding, dilation, n, bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias
    )
    x = torch.randn(n, c_in, 6, 6, dtype=torch.float64)
    out = conv.double()(x).shape
    model = nn.Sequential(
        conv, nn.ReLU(), nn.Flatten(), nn.Linear(out[1] * out[2] * out[3], 3)
    ).double()
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,))


linear_problems = st.builds(
    _linear_problem,
    d_in=st.integers(1, 6),
    d_out=st.integers(2, 4),
    hidden=st.integers(1, 6),
    n=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    loss=st.sampled_from(["ce", "mse"]),
)
conv_problems = st.builds(
    _conv_problem,
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    n=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
fisher_types = st.sampled_from(["true", "mc", "empirical"])
PROPERTY = settings(max_examples=25, deadline=None)


@PROPERTY
@given(problem=st.one_of(linear_problems, conv_problems), fisher_type=fisher_types)
def test_property_ekfac_never_worse_than_kfac(problem, fisher_type):
    model, loss_fn, x, y = problem
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=3)
    exact, kfac, ekfac = (build(m, cap) for m in ("exact", "kfac", "ekfac"))
    for name in cap:
        f = exact[name].to_dense()
        err_e, err_k = _frob(f - ekfac[name].to_dense()), _frob(f - kfac[name].to_dense())
        assert err_e <= err_k + EXACT * _frob(f)


@PROPERTY
@given(
    problem=st.one_of(linear_problems, conv_problems),
    fisher_type=fisher_types,
    damping=st.floats(1e-4, 10.0),
)
def test_property_woodbury_solve_equals_dense_damped_solve(problem, fisher_type, damping):
    model, loss_fn, x, y = problem
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    woodbury, exact = build("woodbury", cap), build("exact", cap)
    for name in cap:
        v = torch.randn(exact[name].size, dtype=torch.float64)
        assert (
            rel_err(
                woodbury[name].solve(v, damping), _damped_solve(exact[name].to_dense(), v, damping)
            )
            <= EXACT
        )


@PROPERTY
@given(
    problem=linear_problems,
    fisher_type=fisher_types,
    damping=st.floats(1e-4, 10.0),
    mode=st.sampled_from(["eigen", "factored"]),
)
def test_property_skfac_equals_kfac_damped_inverse_for_linear_layers(
    problem, fisher_type, damping, mode
):
    model, loss_fn, x, y = problem
    cap = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type, mc_samples=2)
    skfac, kfac = build("skfac", cap, damping_mode=mode), build("kfac", cap, damping_mode=mode)
    for name in cap:
        v = torch.randn(kfac[name].size, 2, dtype=torch.float64)
        assert rel_err(skfac[name].solve(v, damping), kfac[name].solve(v, damping)) <= EXACT
        assert rel_err(skfac[name].to_dense(), kfac[name].to_dense()) <= EXACT


@PROPERTY
@given(problem=linear_problems, fisher_type=fisher_types)
def test_property_kfac_is_exact_for_one_sample_on_linear_layers(problem, fisher_type):
    model, loss_fn, x, y = problem
    cap = fl.capture(model, loss_fn, x[:1], y[:1], fisher_type=fisher_type, mc_samples=3)
    exact, kfac = build("exact", cap), build("kfac", cap)
    for name in cap:
        assert rel_err(kfac[name].to_dense(), exact[name].to_dense()) <= EXACT


def test_skfac_uses_smw_when_batch_is_smaller_than_dimension():
    model, loss_fn, x, y = _linear_problem(30, 3, 20, 4, True, 0, "ce")
    block = fl.curvature("skfac", model, loss_fn, x, y, fisher_type="empirical")["0"]
    _values, vectors = block.eig_omega
    assert vectors.shape == (31, 4)  # only the N=4 non-zero directions of the 31×31 factor


def test_kfac_factored_damping_matches_its_formula():
    model, loss_fn, x, y = _linear_problem(4, 3, 5, 6, True, 1, "ce")
    block = fl.curvature("kfac", model, loss_fn, x, y, damping_mode="factored")["0"]
    pi = factored_pi(block.gamma.diagonal().mean().item(), block.omega.diagonal().mean().item())
    root = math.sqrt(DAMPING)
    damped = torch.kron(
        block.gamma + root / pi * torch.eye(5, dtype=torch.float64),
        block.omega + pi * root * torch.eye(5, dtype=torch.float64),
    )
    index = block.layer.kron_to_param_index()
    v = torch.randn(block.size, dtype=torch.float64)
    expected = torch.linalg.solve(damped[index][:, index], v)
    assert rel_err(block.solve(v, DAMPING), expected) <= EXACT


# ------------------------------------------------------------------------ options and memory
def test_nbytes_of_woodbury_and_skfac_grows_with_batch_not_with_width_squared():
    def nbytes(method, n, d):
        model, loss_fn, x, y = _linear_problem(d, 3, d, n, True, 0, "ce")
        block = fl.curvature(method, model, loss_fn, x, y, fisher_type="empirical")["0"]  # d×d
        if method != "exact":  # include the caches a solve creates
            block.solve(torch.ones(block.size, dtype=torch.float64), DAMPING)
        return block.nbytes

    for method in ("woodbury", "skfac"):
        assert nbytes(method, 16, 16) > 1.5 * nbytes(method, 8, 16)
        assert nbytes(method, 8, 64) < 8 * nbytes(method, 8, 16)  # d² would be 16×, P² 229×
    assert nbytes("exact", 8, 64) > 100 * nbytes("exact", 8, 16)


def test_conv_gram_routes_agree_and_reduce_sum_is_an_approximation():
    model, loss_fn, x, y = _conv_problem(2, 3, 3, 1, 1, 1, 4, True, 0)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="true")
    covariance = build("woodbury", cap, gram_route="covariance")["0"]
    gradients = build("woodbury", cap, gram_route="gradients")["0"]
    assert rel_err(covariance.gram, gradients.gram) <= EXACT
    assert build("woodbury", cap)["0"].gram_route == "gradients"  # counted cheaper here
    assert build("woodbury", cap)["3"].gram_route == "covariance"  # T = 1
    exact, reduced = (
        covariance.to_dense(),
        build("woodbury", cap, conv_gram="reduce_sum")["0"].to_dense(),
    )
    assert _frob(exact - reduced) / _frob(exact) > 0.05
    linear_reduced = build("woodbury", cap, conv_gram="reduce_sum")["3"].to_dense()
    assert rel_err(linear_reduced, build("exact", cap)["3"].to_dense()) <= EXACT


def test_skfac_subsampling_is_unbiased_for_the_expand_factors():
    model, loss_fn, x, y = _conv_problem(1, 2, 3, 1, 1, 1, 3, True, 0)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
    full = build("skfac", cap, conv_reduction="subsample", spatial_samples=36)["0"]
    kfac = build("kfac", cap)["0"]
    assert rel_err(full.to_dense(), kfac.to_dense()) <= EXACT  # all positions: the expand factors
    with pytest.raises(fl.FisherlabError, match=r"spatial_samples in \[1, 36\]"):
        build("skfac", cap, conv_reduction="subsample", spatial_samples=100)
    sub = build("skfac", cap, conv_reduction="subsample", spatial_samples=5, seed=3)["0"]
    assert sub.X.shape == (3 * 5, 10) and sub.options["spatial_samples"] == 5


def test_ekfac_with_a_stale_basis_rescales_in_that_basis():
    model, loss_fn, x, y = _linear_problem(4, 3, 5, 12, True, 0, "ce")
    first = fl.curvature("ekfac", model, loss_fn, x[:6], y[:6])
    second = fl.curvature("ekfac", model, loss_fn, x[6:], y[6:], basis=first)
    exact = fl.curvature("exact", model, loss_fn, x[6:], y[6:])
    for name, block in second.items():
        u_g, u_o = first[name].basis
        q = torch.kron(u_g, u_o)
        f = exact[name].matrix  # Kronecker order
        assert rel_err(block.scalings.flatten(), torch.diagonal(q.T @ f @ q)) <= EXACT
        assert torch.equal(block.u_gamma, u_g)
    wrong = {name: (torch.eye(2), torch.eye(2)) for name in first}
    with pytest.raises(fl.FisherlabError, match="from a layer of another shape"):
        fl.curvature("ekfac", model, loss_fn, x, y, basis=wrong)
    with pytest.raises(fl.FisherlabError, match="no entry for layer"):
        fl.curvature("ekfac", model, loss_fn, x, y, basis={})


@pytest.mark.parametrize("method", fl.METHODS)
def test_rank_deficient_batches_still_solve_finitely(method):
    model, loss_fn, x, y = _linear_problem(6, 3, 8, 4, True, 0, "ce")
    x = torch.cat([x[:1]] * 4)  # one distinct sample, repeated
    x[:, :3] = 0  # and inputs confined to a subspace
    curv = fl.curvature(method, model, loss_fn, x, y[:1].repeat(4))
    for block in curv.values():
        out = block.solve(torch.randn(block.size, dtype=torch.float64), 1e-8)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_damping_is_refused(damping):
    model, loss_fn, x, y = _linear_problem(3, 3, 4, 5, True, 0, "ce")
    block = fl.curvature("kfac", model, loss_fn, x, y)["0"]
    with pytest.raises(fl.FisherlabError, match="damping must be a positive finite number"):
        block.solve(torch.ones(block.size, dtype=torch.float64), damping)


def test_bad_methods_options_and_shapes_are_refused():
    model, loss_fn, x, y = _linear_problem(3, 3, 4, 5, True, 0, "ce")
    with pytest.raises(fl.FisherlabError, match="unknown method 'shampoo'"):
        fl.curvature("shampoo", model, loss_fn, x, y)
    with pytest.raises(
        fl.FisherlabError, match=r"unknown option\(s\) \['conv_gram'\] for method 'kfac'"
    ):
        fl.curvature("kfac", model, loss_fn, x, y, conv_gram="exact")
    with pytest.raises(fl.FisherlabError, match="kfac_approx='kfc' is not valid"):
        fl.curvature("kfac", model, loss_fn, x, y, kfac_approx="kfc")
    block = fl.curvature("diag", model, loss_fn, x, y)["0"]
    with pytest.raises(fl.FisherlabError, match=r"expected a vector \[16\]"):
        block.matvec(torch.ones(5, dtype=torch.float64))


def test_memory_is_estimated_before_allocating():
    model, loss_fn, x, y = _linear_problem(40, 3, 30, 50, True, 0, "ce")
    with pytest.raises(
        fl.MemoryBudgetError, match=r"exact block of layer '0' \(1230×1230\).*'woodbury'"
    ):
        fl.curvature("exact", model, loss_fn, x, y, max_bytes=2**20)
    with pytest.raises(
        fl.MemoryBudgetError, match=r"Woodbury Gram of layer '0' \(150×150\).*'kfac'"
    ):
        fl.curvature("woodbury", model, loss_fn, x, y, max_bytes=10_000)
    block = fl.curvature("kfac", model, loss_fn, x, y)["0"]
    with pytest.raises(fl.MemoryBudgetError, match=r"1230×1230.*matvec\(\)/solve\(\)"):
        block.to_dense(max_bytes=2**20)


def test_results_record_fisher_type_and_options():
    model, loss_fn, x, y = _linear_problem(3, 3, 4, 5, True, 0, "ce")
    curv = fl.curvature(
        "skfac", model, loss_fn, x, y, fisher_type="mc", mc_samples=2, damping_mode="factored"
    )
    assert curv.fisher_type == "mc" and curv.options["damping_mode"] == "factored"
    assert curv["0"].fisher_type == "mc" and curv["0"].options["conv_reduction"] == "sum"
    assert "skfac" in repr(curv["0"]) or "SKFAC" in repr(curv["0"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("damping", [1e-6, 1e-3, 1.0])
@pytest.mark.parametrize(
    "samples, rank", [(32, "full"), (6, "deficient")], ids=["full-rank", "rank-deficient"]
)
def test_woodbury_solve_follows_the_conditioning(dtype, damping, samples, rank):
    """Within 100·ε·cond(F + λI) of the dense solve, also when ‖F‖/λ is huge but F is well
    conditioned (Linear(16, 10), MSE sum: 10 rows per sample, P = 170)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 10)).to(dtype)
    x = 3 * torch.randn(samples, 16, dtype=dtype)
    y = torch.randn(samples, 10, dtype=dtype)
    problem = fl.Problem(model, nn.MSELoss(reduction="sum"), (x, y))
    block = fl.curvature("woodbury", problem)["0"]
    dense = fl.curvature("exact", problem)["0"].to_dense().double()
    values = torch.linalg.eigvalsh(dense)
    assert (values[0] > 1.0) == (rank == "full")
    v = torch.randn(block.size, dtype=torch.float64)
    reference = torch.linalg.solve(dense + damping * torch.eye(block.size).double(), v)
    solved = block.solve(v.to(dtype), damping).double()
    cond = float((values[-1] + damping) / (values[0].clamp_min(0) + damping))
    error = float((solved - reference).norm() / reference.norm())
    assert error <= 100 * torch.finfo(dtype).eps * cond
