"""Trajectory analyses against float64 brute force (torch.func per-sample gradients, dense)."""

import math

import pytest
import torch
from torch import Tensor, nn

import fisherlab as fl
from fisherlab import analysis as an
from fisherlab.analysis.decomposition import sample_batches
from fisherlab.metrics import spectrum_distance
from tests.helpers import per_sample_grads

TOL = 1e-8  # float64 quantities equal in exact arithmetic (differences of matrices ~1)
LAYERS = ("0", "2")


@pytest.fixture(scope="module")
def tiny():
    """A 5-4-3 tanh MLP on 24 random samples, trained 2 epochs (batch 8), every step kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    run = an.train_trajectory(model, loss_fn, x, y, epochs=2, batch_size=8, lr=0.5)
    return run, loss_fn, x, y


# ----------------------------------------------------------------- brute-force references
def _inputs(model: nn.Module, name: str, x: Tensor) -> Tensor:
    """Homogeneous inputs ``[a; 1]`` of a layer of the Sequential, ``[N, d_in+1]``."""
    a = model[: int(name)](x).detach()
    return torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)


def _to_param(d_out: int, d_in: int) -> Tensor:
    """Index map: parameter order (W row-major, then b) → Kronecker order vec_r([W | b])."""
    order = [i * (d_in + 1) + j for i in range(d_out) for j in range(d_in)]
    return torch.tensor(order + [i * (d_in + 1) + d_in for i in range(d_out)])


class Brute:
    """Empirical Fisher, KFAC and EKFAC of one layer from per-sample gradients."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, name: str):
        layer = model.get_submodule(name)
        self.d_out, self.d_in = layer.weight.shape
        self.j = per_sample_grads(model, loss_fn, x, y, name)  # [N, P] (summed per-sample loss)
        n = len(x)
        self.fisher = self.j.T @ self.j / n
        a = _inputs(model, name, x)
        g = self.j[:, -self.d_out :]  # the bias gradient is the output gradient
        self.gamma, self.omega = g.T @ g / n, a.T @ a / n
        self.perm = _to_param(self.d_out, self.d_in)

    def kron(self, m: Tensor) -> Tensor:
        """A matrix in Kronecker order, returned in parameter order."""
        return m[self.perm][:, self.perm]

    def basis(self) -> Tensor:
        """``Q = U_Γ ⊗ U_Ω`` in parameter order (rows)."""
        q = torch.kron(torch.linalg.eigh(self.gamma)[1], torch.linalg.eigh(self.omega)[1])
        return q[self.perm]

    def kfac(self) -> Tensor:
        return self.kron(torch.kron(self.gamma, self.omega))

    def ekfac(self, q: Tensor | None = None, scalings_of: Tensor | None = None) -> Tensor:
        """``Q diag(diag(QᵀFQ)) Qᵀ`` with ``Q`` (default: own basis) and ``F`` (default: own)."""
        q = self.basis() if q is None else q
        f = self.fisher if scalings_of is None else scalings_of
        s = torch.diagonal(q.T @ f @ q)
        return q @ torch.diag(s) @ q.T


def _rel(a: Tensor, b: Tensor, norm: Tensor) -> float:
    return float((torch.linalg.matrix_norm(a - b) / norm).detach())


# ----------------------------------------------------------------------------- trajectory
def test_checkpoints_replay_the_recorded_batches(tiny):
    run, loss_fn, x, y = tiny
    assert run.steps == list(range(7)) and len(run.batches) == 6
    assert torch.equal(torch.sort(torch.cat(run.batches[:3])).values, torch.arange(24))
    model = run.model_at(0)
    for step, index in enumerate(run.batches):
        model.zero_grad()
        loss_fn(model(x[index]), y[index]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        for p, q in zip(model.parameters(), run.model_at(step + 1).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    state = an.training_state(run.model_at(6), loss_fn, x, y)
    assert state["loss"] == pytest.approx(run.at(6).loss, rel=1e-12)
    assert run.at(3).epoch == 1.0


def test_train_trajectory_rejects_checkpoints_past_the_end(tiny):
    run, loss_fn, x, y = tiny
    with pytest.raises(an.setup.FisherlabError, match="checkpoints"):
        an.train_trajectory(run.model_at(0), loss_fn, x, y, epochs=1, checkpoints=[4], batch_size=8)


# -------------------------------------------------------------------------- decomposition
def test_error_decomposition_matches_brute_force(tiny):
    run, loss_fn, x, y = tiny
    step, lag, b, count = 5, 2, 4, 2
    data = an.error_decomposition(
        run, loss_fn, x, y, [step], lag, batch_size=b, batches=count,
        methods=["kfac", "ekfac", "diag"], fisher_type="empirical", seed=3,
    )  # fmt: skip
    index = sample_batches(len(x), b, 2 * count, 3)
    now, old = run.model_at(step), run.model_at(step - lag)
    rows = {(r["layer"], r["method"]): r for r in data.rows("errors")}
    assert len(rows) == 2 * 3
    for name in LAYERS:
        ref, ref_old = Brute(now, loss_fn, x, y, name), Brute(old, loss_fn, x, y, name)
        f, norm = ref.fisher, torch.linalg.matrix_norm(ref.fisher)
        now_b = [Brute(now, loss_fn, x[i], y[i], name) for i in index[:count]]
        old_b = [Brute(old, loss_fn, x[i], y[i], name) for i in index[count:]]
        build = {
            "kfac": lambda m: m.kfac(),
            "ekfac": lambda m: m.ekfac(),
            "diag": lambda m: torch.diag(torch.diagonal(m.fisher)),
        }
        stale = {"kfac": ref_old.kfac(), "ekfac": ref.ekfac(q=ref_old.basis())}
        stale["diag"] = build["diag"](ref_old)
        for method, make in build.items():
            r = rows[name, method]
            a_ref = make(ref)
            est = torch.tensor([_rel(make(m), a_ref, norm) for m in now_b])
            if method == "ekfac":  # the old batch's basis, the current batch's scalings
                deployed = [m.ekfac(q=o.basis()) for m, o in zip(now_b, old_b)]
            else:
                deployed = [make(o) for o in old_b]
            tot = torch.tensor([_rel(d, f, norm) for d in deployed])
            assert r["structural"] == pytest.approx(_rel(a_ref, f, norm), rel=TOL)
            assert r["estimation"] == pytest.approx(float(est.mean()), rel=TOL)
            assert r["estimation_sd"] == pytest.approx(float(est.std()), rel=1e-6)
            assert r["staleness"] == pytest.approx(_rel(stale[method], a_ref, norm), rel=TOL)
            assert r["total"] == pytest.approx(float(tot.mean()), rel=TOL)

            def scaled(a: Tensor, f: Tensor = f, norm: Tensor = norm) -> float:
                return _rel(float((f * a).sum() / (a**2).sum()) * a, f, norm)

            assert r["structural_scaled"] == pytest.approx(scaled(a_ref), rel=1e-7)
            trace = float(f.trace() / a_ref.trace()) * a_ref
            assert r["structural_trace"] == pytest.approx(_rel(trace, f, norm), rel=1e-7)
            expected = float(torch.tensor([scaled(d) for d in deployed]).mean())
            assert r["total_scaled"] == pytest.approx(expected, rel=1e-7)
        # EKFAC's theorem on the reference set: never worse than KFAC
        assert rows[name, "ekfac"]["structural"] <= rows[name, "kfac"]["structural"] + TOL


# -------------------------------------------------------------------------- EKFAC protocol
def test_ekfac_protocol_matches_brute_force(tiny):
    run, loss_fn, x, y = tiny
    decay = 0.9
    data = an.ekfac_protocol(run, loss_fn, x, y, [0, 4], decay=decay)
    rows = {(r["step"], r["layer"], r["method"]): r for r in data.rows("curves")}
    assert {k[2] for k in rows if k[0] == 0} == {"kfac", "kfac-trace", "ekfac", "kfac-fresh"}
    everything = torch.cat(
        [per_sample_grads(run.model_at(4), loss_fn, x, y, name) for name in LAYERS], dim=1
    ).detach()
    sq = (everything**2).sum(1)
    n_eff = float(sq.sum() ** 2 / (sq**2).sum())
    for name in LAYERS:
        first = Brute(run.model_at(0), loss_fn, x, y, name)
        q = first.basis()
        now = Brute(run.model_at(4), loss_fn, x, y, name)
        average = None
        for step in range(4):  # running average of each update's batch scalings in the basis
            i = run.batches[step]
            batch = Brute(run.model_at(step), loss_fn, x[i], y[i], name)
            s = torch.diagonal(q.T @ batch.fisher @ q)
            average = s if average is None else decay * average + (1 - decay) * s
        expected = {
            "kfac": first.kfac(),
            "ekfac": now.ekfac(q=q),
            "ekfac-ra": q @ torch.diag(average) @ q.T,
            "kfac-fresh": now.kfac(),
        }
        f = now.fisher
        expected["kfac-trace"] = float(f.trace() / first.kfac().trace()) * first.kfac()
        exact_spec = torch.linalg.eigvalsh(f).flip(0).clamp_min(0)
        for method, approx in expected.items():
            r = rows[4, name, method]
            norm = torch.linalg.matrix_norm(f)
            assert r["rel_frobenius"] == pytest.approx(_rel(approx, f, norm), rel=TOL)
            spec = torch.linalg.eigvalsh(approx).flip(0)
            assert r["spectrum_distance"] == pytest.approx(
                spectrum_distance(exact_spec, spec), rel=1e-6, abs=1e-10
            )
            alpha = float((f * approx).sum() / (approx**2).sum())
            assert r["alpha"] == pytest.approx(alpha, rel=1e-8)
            assert r["rel_frobenius_scaled"] == pytest.approx(
                _rel(alpha * approx, f, norm), rel=1e-7
            )
            assert r["spectrum_distance_scaled"] == pytest.approx(
                spectrum_distance(exact_spec, alpha * spec), rel=1e-6, abs=1e-10
            )
            assert r["fisher_norm_ratio"] == pytest.approx(
                float(norm / torch.linalg.matrix_norm(first.fisher)), rel=1e-10
            )
            assert r["n_eff"] == pytest.approx(n_eff, rel=1e-10)
        # trace matching is the frozen KFAC's trace-matched error, by construction
        assert rows[4, name, "kfac-trace"]["rel_frobenius"] == pytest.approx(
            rows[4, name, "kfac"]["rel_frobenius_trace"], rel=1e-8
        )
        # at the basis step, the frozen and the fresh KFAC coincide and EKFAC is not worse
        r0 = {m: rows[0, name, m]["rel_frobenius"] for m in ("kfac", "ekfac", "kfac-fresh")}
        assert r0["kfac"] == pytest.approx(r0["kfac-fresh"], rel=TOL)
        assert r0["ekfac"] <= r0["kfac"] + TOL


# ---------------------------------------------------------------------------------- FNGD
def test_coefficient_sharing_matches_brute_force(tiny):
    run, loss_fn, x, y = tiny
    delta = 1e-2
    data = an.coefficient_sharing(
        run, loss_fn, x, y, epochs=[1], dampings=[delta], positions=[1], seed=3
    )
    rows = {r["layer"]: r for r in data.rows("cosines")}
    assert set(rows) == {*LAYERS, "network"}
    i = run.batches[1]
    step = 3 + 1
    j = run.batches[step]
    dirs = {"fresh": [], "shared": [], "gradient": [], "permuted": []}
    shuffle = torch.randperm(len(j), generator=torch.Generator().manual_seed(3 + step))
    assert not torch.equal(shuffle, torch.arange(len(j)))
    for name in LAYERS:
        then = per_sample_grads(run.model_at(1), loss_fn, x[i], y[i], name)
        now = per_sample_grads(run.model_at(step), loss_fn, x[j], y[j], name)
        n = len(now)

        def weights(jac: Tensor) -> Tensor:
            k, eye = jac @ jac.T, torch.eye(len(jac), dtype=jac.dtype)
            return torch.linalg.solve(k + delta * torch.linalg.matrix_norm(k) * eye, eye.sum(1))

        grad = now.mean(0)
        fresh = now.T @ weights(now)
        # the weighted sum is the damped natural gradient (F + λI)⁻¹g, λ = δ‖K‖/N
        lam = delta * float(torch.linalg.matrix_norm(now @ now.T)) / n
        dense = torch.linalg.solve(now.T @ now / n + lam * torch.eye(now.shape[1]), grad)
        assert (
            float(torch.linalg.vector_norm(fresh - dense) / torch.linalg.vector_norm(dense)) < 1e-6
        )
        shared = now.T @ weights(then)
        cos = torch.nn.functional.cosine_similarity
        assert rows[name]["shared"] == pytest.approx(float(cos(shared, fresh, dim=0)), rel=TOL)
        assert rows[name]["gradient"] == pytest.approx(float(cos(grad, fresh, dim=0)), rel=TOL)
        permuted = now.T @ weights(then)[shuffle]
        assert rows[name]["permuted"] == pytest.approx(float(cos(permuted, fresh, dim=0)), rel=TOL)
        for key, v in (("fresh", fresh), ("shared", shared), ("gradient", grad),
                       ("permuted", permuted)):  # fmt: skip
            dirs[key].append(v)
    cat = {k: torch.cat(v) for k, v in dirs.items()}
    for key in ("shared", "permuted"):
        expected = torch.nn.functional.cosine_similarity(cat[key], cat["fresh"], dim=0)
        assert rows["network"][key] == pytest.approx(float(expected), rel=TOL)


# -------------------------------------------------------------------------- block diagonal
def test_block_diagonal_error_matches_brute_force(tiny):
    run, loss_fn, x, y = tiny
    model = run.model_at(6)
    problem = an.reference_problem(model, loss_fn, x, y, "empirical")
    data = an.block_diagonal_error(problem, relative_dampings=[1e-2, 1.0])
    j = torch.cat([per_sample_grads(model, loss_fn, x, y, name) for name in LAYERS], dim=1)
    j = j.detach()
    f = j.T @ j / len(x)
    g = j.mean(0)
    sizes = [model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel()
             for n in LAYERS]  # fmt: skip
    slices = [slice(0, sizes[0]), slice(sizes[0], sum(sizes))]
    mask = torch.zeros_like(f, dtype=torch.bool)
    for s in slices:
        mask[s, s] = True
    assert data.meta["offdiagonal_energy"] == pytest.approx(
        float((f[~mask] ** 2).sum() / (f**2).sum()), rel=TOL
    )
    rows = {(r["relative_damping"], r["layer"]): r for r in data.rows("errors")}
    top = float(torch.linalg.eigvalsh(f)[-1])
    for rel in (1e-2, 1.0):
        lam = rel * top
        inverse = torch.linalg.inv(f + lam * torch.eye(len(f)))
        blockwise = torch.zeros_like(f)
        for s in slices:
            blockwise[s, s] = torch.linalg.inv(f[s, s] + lam * torch.eye(s.stop - s.start))
        for name, s in zip(LAYERS, slices):
            r = rows[rel, name]
            err = torch.linalg.matrix_norm(inverse[s, s] - blockwise[s, s])
            assert r["inverse_error"] == pytest.approx(
                float(err / torch.linalg.matrix_norm(inverse[s, s])), rel=1e-7
            )
            cos = torch.nn.functional.cosine_similarity(
                inverse[s] @ g, blockwise[s, s] @ g[s], dim=0
            )
            assert r["cosine"] == pytest.approx(float(cos), rel=1e-7)
            cos = torch.nn.functional.cosine_similarity(inverse[s] @ g, g[s], dim=0)
            assert r["gradient_cosine"] == pytest.approx(float(cos), rel=1e-7)
        cos = torch.nn.functional.cosine_similarity(inverse @ g, blockwise @ g, dim=0)
        assert rows[rel, "network"]["cosine"] == pytest.approx(float(cos), rel=1e-7)
        cos = torch.nn.functional.cosine_similarity(inverse @ g, g, dim=0)
        assert rows[rel, "network"]["gradient_cosine"] == pytest.approx(float(cos), rel=1e-7)
    # more damping, closer to the block-diagonal inverse (both tend to I/λ)
    assert rows[1.0, "network"]["inverse_error"] < rows[1e-2, "network"]["inverse_error"]


def test_heatmaps_with_the_network_reference_show_the_block_of_the_full_inverse(tiny):
    run, loss_fn, x, y = tiny
    model = run.model_at(6)
    data = an.block_heatmaps(
        model, loss_fn, x, y, layer="2", damping=1e-2, fisher_type="empirical",
        reference="network", methods=["woodbury"],
    )  # fmt: skip
    j = torch.cat([per_sample_grads(model, loss_fn, x, y, name) for name in LAYERS], dim=1)
    j = j.detach()
    f = j.T @ j / len(x)
    p0 = 4 * 5 + 4
    inverse = torch.linalg.inv(f + 1e-2 * torch.eye(len(f)))[p0:, p0:]
    shown = an.rows_to_matrices(data.rows("inverse"))
    assert _rel(shown["exact"], inverse, torch.linalg.matrix_norm(inverse)) < 1e-6  # κ ≈ 1e8
    block = torch.linalg.inv(f[p0:, p0:] + 1e-2 * torch.eye(len(f) - p0))
    assert _rel(shown["woodbury"], block, torch.linalg.matrix_norm(block)) < 1e-6
    summaries = {r["method"]: r for r in data.rows("summary")}
    assert set(summaries) == {"zero", "identity", "woodbury"}
    summary = summaries["woodbury"]
    expected = torch.linalg.matrix_norm(block - inverse) / torch.linalg.matrix_norm(inverse)
    assert summary["rel_frobenius_inverse"] == pytest.approx(float(expected), rel=1e-7)
    assert not math.isclose(summary["rel_frobenius_inverse"], 0.0)
    # controls: the whitened error against E = [(F+λI)⁻¹]_ll by a dense matrix square root,
    # and the cosine to the layer's part of the exact damped natural gradient (g: loss gradient)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    root = torch.from_numpy(scipy_linalg.sqrtm(torch.linalg.inv(inverse).numpy()).real)
    g = j.mean(0)
    target = (torch.linalg.inv(f + 1e-2 * torch.eye(len(f))) @ g)[p0:]
    cos = torch.nn.functional.cosine_similarity
    eye = torch.eye(len(f) - p0, dtype=f.dtype)
    p = len(f) - p0
    for key, approx in (("woodbury", block), ("zero", eye / 1e-2)):
        white = torch.linalg.matrix_norm(root @ approx @ root - eye) / math.sqrt(p)
        assert summaries[key]["whitened_error"] == pytest.approx(float(white), rel=1e-6)
        expected_cos = float(cos(approx @ g[p0:], target, dim=0))
        assert summaries[key]["direction_cosine"] == pytest.approx(expected_cos, rel=1e-7)
    mean = float(f[p0:, p0:].trace()) / p
    identity_inverse = eye / (mean + 1e-2)
    expected = torch.linalg.matrix_norm(identity_inverse - inverse) / torch.linalg.matrix_norm(
        inverse
    )
    assert summaries["identity"]["rel_frobenius_inverse"] == pytest.approx(
        float(expected), rel=1e-7
    )
    assert summaries["zero"]["rel_frobenius_block"] == 1.0
    assert summaries["zero"]["baseline"] and not summary["baseline"]


# ---------------------------------------------------------------------------------- sweeps
def test_batch_size_sweep_matches_brute_force(tiny):
    run, loss_fn, x, y = tiny
    model = run.model_at(6)
    data = an.batch_size_sweep(model, loss_fn, x, y, sizes=[6, 24], repeats=2, seed=5)
    rows = {(r["batch_size"], r["repeat"], r["layer"], r["method"]): r for r in data.rows("sweep")}
    assert {k[:2] for k in rows} == {(6, 0), (6, 1), (24, 0)}
    index = sample_batches(len(x), 6, 2, 5 + 6)
    for name in LAYERS:
        ref = Brute(model, loss_fn, x, y, name)
        f, g = ref.fisher, ref.j.mean(0)
        lam = 0.1 * float(f.trace()) / len(f)
        eye = torch.eye(len(f), dtype=f.dtype)
        target = torch.linalg.solve(f + lam * eye, g)
        for r, i in enumerate(index):
            batch = Brute(model, loss_fn, x[i], y[i], name)
            for method, approx in (("exact", batch.fisher), ("kfac", batch.kfac()),
                                   ("ekfac", batch.ekfac())):  # fmt: skip
                row = rows[6, r, name, method]
                norm = torch.linalg.matrix_norm(f)
                assert row["rel_frobenius"] == pytest.approx(_rel(approx, f, norm), rel=TOL)
                d = torch.linalg.solve(approx + lam * eye, g)
                cos = torch.nn.functional.cosine_similarity(d, target, dim=0)
                assert row["cosine"] == pytest.approx(float(cos), rel=1e-7)
                alpha = float((f * approx).sum() / (approx**2).sum())
                assert row["rel_frobenius_scaled"] == pytest.approx(
                    _rel(alpha * approx, f, norm), rel=1e-7
                )
        baseline = rows[6, 0, name, "gradient"]
        cos = torch.nn.functional.cosine_similarity(g, target, dim=0)
        assert baseline["cosine"] == pytest.approx(float(cos), rel=1e-7)
        assert baseline["rel_frobenius"] == 1.0
        assert (6, 1, name, "gradient") not in rows
        # the whole set's own block is the reference: Woodbury/TENGraD exact there
        assert rows[24, 0, name, "exact"]["rel_frobenius"] < 1e-12
        assert rows[24, 0, name, "exact"]["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_fisher_type_comparison_matches_the_exact_blocks(tiny):
    run, loss_fn, x, y = tiny
    data = an.fisher_type_comparison(run, loss_fn, x, y, steps=[6], mc_samples=2)
    rows = {(r["layer"], r["fisher_type"]): r for r in data.rows("types")}
    model = run.model_at(6)
    dense = {
        kind: {
            n: b.to_dense()
            for n, b in fl.exact_blocks(
                model, loss_fn, x, y, fisher_type=kind, mc_samples=2
            ).items()
        }
        for kind in an.FISHER_TYPES
    }
    for name in LAYERS:
        ref = Brute(model, loss_fn, x, y, name)
        torch.testing.assert_close(dense["empirical"][name], ref.fisher, rtol=1e-10, atol=1e-14)
        assert rows[name, "true"]["to_true"] == 0.0
        for kind in ("mc", "empirical"):
            f, true = dense[kind][name], dense["true"][name]
            expected = torch.linalg.matrix_norm(f - true) / torch.linalg.matrix_norm(true)
            assert rows[name, kind]["to_true"] == pytest.approx(float(expected), rel=1e-8)
        norm = torch.linalg.matrix_norm(ref.fisher)
        assert rows[name, "empirical"]["kfac"] == pytest.approx(
            _rel(ref.kfac(), ref.fisher, norm), rel=TOL
        )


def test_spatial_sweep_on_a_convolution():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    ).double()
    loss_fn = nn.CrossEntropyLoss()
    data = an.spatial_sweep(model, loss_fn, x, y, samples=(1, 16), batch_size=4, repeats=2)
    rows = data.rows("sweep")
    assert {r["layer"] for r in rows} == {"0"}  # convolutions only
    ref = {(r["source"], r["repeat"], r["spatial_samples"]): r["rel_frobenius"] for r in rows}
    problem = an.reference_problem(model, loss_fn, x, y, "empirical")
    exact = fl.curvature("exact", problem)["0"].to_dense()
    for method, count in (("kfac", -1), ("skfac", 0)):
        approx = fl.curvature(method, problem)["0"].to_dense()
        assert ref["reference", 0, count] == pytest.approx(
            float(torch.linalg.matrix_norm(approx - exact) / torch.linalg.matrix_norm(exact)),
            rel=TOL,
        )
    # all 16 positions "subsampled" (T = 16): the expand factors, up to the split of T
    assert ref["reference", 0, 16] == pytest.approx(ref["reference", 0, -1], rel=1e-8)
    assert ref["reference", 0, 1] != pytest.approx(ref["reference", 0, 16], rel=1e-3)


def test_ekfac_protocol_with_an_amortised_basis(tiny):
    run, loss_fn, x, y = tiny
    data = an.ekfac_protocol(run, loss_fn, x, y, [2, 3, 4], basis_every=2)
    rows = {(r["step"], r["layer"], r["method"]): r for r in data.rows("curves")}
    assert data.meta["basis"] == "every 2 steps"
    for name in LAYERS:
        for step in (2, 4):  # recomputed here: the frozen KFAC is the fresh one, EKFAC ≤ KFAC
            r = {m: rows[step, name, m] for m in ("kfac", "ekfac", "kfac-fresh")}
            assert r["kfac"]["basis_step"] == step
            assert r["kfac"]["rel_frobenius"] == pytest.approx(
                r["kfac-fresh"]["rel_frobenius"], rel=TOL
            )
            assert r["ekfac"]["rel_frobenius"] <= r["kfac"]["rel_frobenius"] + TOL
        # one step after a recomputation: the factors of step 2 against the Fisher of step 3
        first = Brute(run.model_at(2), loss_fn, x, y, name)
        now = Brute(run.model_at(3), loss_fn, x, y, name)
        norm = torch.linalg.matrix_norm(now.fisher)
        assert rows[3, name, "kfac"]["basis_step"] == 2
        assert rows[3, name, "kfac"]["rel_frobenius"] == pytest.approx(
            _rel(first.kfac(), now.fisher, norm), rel=TOL
        )


def test_train_trajectory_with_a_fisherlab_optimizer_replays_exactly(tiny):
    _, loss_fn, x, y = tiny
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    options = {"damping": 1e-2}
    run = an.train_trajectory(
        model, loss_fn, x, y, epochs=1, batch_size=8, lr=0.1, optimizer="kfac",
        optimizer_options=options,
    )  # fmt: skip
    assert run.settings["optimizer"] == "kfac" and run.steps == [0, 1, 2, 3]
    replay = run.model_at(0)
    opt = fl.optim.KFAC(replay, lr=0.1, **options)
    for step, index in enumerate(run.batches):
        opt.zero_grad()
        loss_fn(replay(x[index]), y[index]).backward()
        opt.step()
        for p, q in zip(replay.parameters(), run.model_at(step + 1).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    copy = run.model_at(3)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in copy.modules())
    moved = copy[0].weight - run.model_at(0)[0].weight
    assert float(moved.abs().max()) > 1e-4
    with pytest.raises(an.setup.FisherlabError, match="unknown optimizer"):
        an.train_trajectory(model, loss_fn, x, y, epochs=1, batch_size=8, optimizer="adamw")


# ------------------------------------------------------------ a user's model and checkpoints
USER_MODULE = """
import torch
from torch import nn


def factory():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def wider():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def not_a_module():
    return 42
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A model factory in a temporary module, and checkpoints of it saved as files."""
    (tmp_path / "my_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_user_models

    model = my_user_models.factory()
    states = {}
    for step in (0, 3, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(states[0], tmp_path / "ckpt-0.pt")
    torch.save(states[3], tmp_path / "ckpt-3.pt")
    torch.save({"state_dict": states[10], "step": 10, "epoch": 2.5}, tmp_path / "last.pt")
    return tmp_path, states


def test_a_user_model_and_checkpoint_files_make_a_trajectory(user_module):
    folder, states = user_module
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss()
    files = [folder / "ckpt-0.pt", folder / "ckpt-3.pt", folder / "last.pt"]
    run = an.load_trajectory("my_user_models:factory", files, loss_fn, x, y, steps_per_epoch=4)
    assert run.steps == [0, 3, 10]
    assert [c.epoch for c in run.checkpoints] == [0.0, 0.75, 2.5]
    for step in (0, 3, 10):
        model = run.model_at(step)
        for k, v in model.state_dict().items():
            assert torch.equal(v, states[step][k])
        with torch.no_grad():
            assert run.at(step).loss == pytest.approx(float(loss_fn(model(x), y)), rel=1e-12)
    # a glob pattern, sorted by step; and a family runs on it
    globbed = an.load_trajectory("my_user_models:factory", str(folder / "ckpt-*.pt"), loss_fn, x, y)
    assert globbed.steps == [0, 3]
    data = an.fisher_type_comparison(globbed, loss_fn, x, y, steps=[0, 3])
    assert {r["step"] for r in data.rows("types")} == {0, 3}


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("my_user_models:wider", r"'0\.weight' has shape \(4, 5\), the model's is \(6, 5\)"),
        ("no_such_module_xyz:factory", "does not import"),
        ("my_user_models:missing", "has no callable 'missing'"),
        ("my_user_models:not_a_module", "returned int, not a torch.nn.Module"),
        ("my_user_models", "package.module:factory"),
    ],
    ids=["shapes", "import", "attribute", "not-module", "no-colon"],
)
def test_user_models_that_do_not_fit_are_refused_in_one_line(user_module, factory, message):
    folder, _ = user_module
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(fl.FisherlabError, match=message) as err:
        an.load_trajectory(factory, [folder / "ckpt-0.pt"], nn.CrossEntropyLoss(), x, y)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["ckpt-3.pt", "ckpt-0.pt"], "not increasing: 3 before 0"),
        (["ckpt-3.pt", "ckpt-3.pt"], "step 3 appears twice"),
        (["nothing-here.pt"], "does not exist"),
    ],
    ids=["unordered", "repeated", "missing"],
)
def test_checkpoint_lists_with_bad_steps_are_refused(user_module, names, message):
    folder, _ = user_module
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    files = [folder / n for n in names]
    with pytest.raises(fl.FisherlabError, match=message):
        an.load_trajectory("my_user_models:factory", files, nn.CrossEntropyLoss(), x, y)


def test_a_checkpoint_with_an_extra_entry_is_refused(user_module):
    folder, states = user_module
    torch.save({**states[0], "extra.weight": torch.zeros(2)}, folder / "odd-1.pt")
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(fl.FisherlabError, match=r"unexpected entry 'extra\.weight'"):
        an.load_trajectory(
            "my_user_models:factory", [folder / "odd-1.pt"], nn.CrossEntropyLoss(), x, y
        )
