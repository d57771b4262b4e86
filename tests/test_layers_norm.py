"""Scale-and-shift layers (BatchNorm in eval mode, LayerNorm, GroupNorm) and the other layer
types of the zoo (:data:`fisherlab.zoo.LAYER_TYPE_CASES`: a tiny ResNet with BatchNorm, a token
model with Embedding and LayerNorm, a CNN with GroupNorm and a multi-dimensional LayerNorm).

Exact blocks from the capture and from both backends against brute force (per-sample
``torch.func`` gradients, the dense ``JᵀHJ``) and against curvlinops over a list of batches;
every method on every layer (none skipped); kfac-jax's scale-and-shift blocks; BatchNorm in
training mode (the documented choice); the table's refusals; ``compare`` and ``verify``.
"""

import pytest
import torch
from helpers import EXACT, brute_force_ggn, normaliser, per_sample_grads, rel_err
from torch import nn

import fisherlab as fl
from fisherlab.blocks import BLOCK_TABLE, METHODS
from fisherlab.blocks.base import LayerStats
from fisherlab.blocks.scale_shift import ScaleAndShiftDiagonal, ScaleAndShiftFull
from fisherlab.capture import captures
from fisherlab.layers import adapter_for
from fisherlab.verification import verify_problem
from fisherlab.zoo import LAYER_TYPE_CASES, randomise_norm_layers

CASE_IDS = [c.name for c in LAYER_TYPE_CASES]
N = 5


def _problem(case, fisher_type, n=N, seed=0):
    model, loss_fn, x, y = case.build(n, seed)
    return fl.Problem(model, loss_fn, (x, y), fisher_type=fisher_type, mc_samples=2)


# ------------------------------------------------------------------------ exact blocks
@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_exact_blocks_equal_brute_force(case, fisher_type):
    model, loss_fn, x, y = case.build(N)
    problem = fl.Problem(model, loss_fn, (x, y), fisher_type=fisher_type)
    by_func = fl.exact_blocks(problem, backend="torch.func")
    from_capture = fl.curvature("exact", problem)
    assert set(by_func) == set(from_capture) == set(problem.layers)
    if fisher_type == "true":  # one dense JᵀHJ over every layer, in the layers' order
        full, start = brute_force_ggn(model, loss_fn, x, y, list(problem.layers)), 0
    for name, layer in problem.layers.items():
        if fisher_type == "empirical":
            g = per_sample_grads(model, loss_fn, x, y, name)
            reference = g.T @ g / normaliser(loss_fn, model(x))
        else:
            size = layer.num_params
            reference, start = full[start : start + size, start : start + size], start + size
        assert rel_err(by_func[name], reference) <= EXACT, name
        assert rel_err(from_capture[name].to_dense(), reference) <= EXACT, name


@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
def test_monte_carlo_rows_of_capture_and_backend_agree(case):
    problem = _problem(case, "mc")
    by_func = fl.exact_blocks(problem, backend="torch.func")
    from_capture = fl.curvature("exact", problem)
    for name, block in from_capture.items():
        assert rel_err(block.to_dense(), by_func[name]) <= EXACT, name


@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
def test_capture_rows_are_the_per_sample_gradients(case):
    model, loss_fn, x, y = case.build(N)
    cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
    for name, lc in cap.items():
        reference = per_sample_grads(model, loss_fn, x, y, name)
        assert rel_err(lc.jacobian_rows()[0], reference) <= EXACT, name


def _bn_sequential(kind):
    if kind == "batchnorm1d":
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(6, 4, dtype=torch.float64)
    elif kind == "batchnorm1d-sequence":
        model = nn.Sequential(
            nn.Conv2d(2, 3, (1, 2)), nn.Flatten(2), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(9, 3)
        )
        x = torch.randn(6, 2, 1, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)
        )
        x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    return randomise_norm_layers(model.double()), x, torch.randint(0, 3, (6,))


@pytest.mark.parametrize("kind", ["batchnorm1d", "batchnorm1d-sequence", "batchnorm2d"])
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_backpack_takes_batchnorm_in_eval_mode(kind, fisher_type):
    model, x, y = _bn_sequential(kind)
    problem = fl.Problem(model, nn.CrossEntropyLoss(), (x, y), fisher_type=fisher_type)
    auto = fl.exact_blocks(problem)
    by_func = fl.exact_blocks(problem, backend="torch.func")
    assert auto.backend == "backpack"
    for name in by_func:
        assert rel_err(auto[name], by_func[name]) <= EXACT, name


def test_auto_backend_routes_layernorm_to_torch_func_with_the_reason():
    model = randomise_norm_layers(
        nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    )
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    blocks = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    assert blocks.backend == "torch.func"
    assert "'1' (LayerNorm)" in blocks.backend_reason


SIZES = (4, 4, 2)


@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_data_set_blocks_equal_curvlinops(case, fisher_type):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, x, y = case.build(sum(SIZES), seed=3)
    batches, start = [], 0
    for size in SIZES:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    problem = fl.Problem(model, loss_fn, batches, fisher_type=fisher_type)
    full = fl.exact_fisher(problem)  # every parameter, model.parameters() order
    blocks = fl.curvature("exact", problem)
    params = list(model.parameters())
    operator = {"true": curvlinops.GGNLinearOperator, "empirical": curvlinops.EFLinearOperator}
    peer = operator[fisher_type](model, loss_fn, params, batches, check_deterministic=False)
    dense = peer @ torch.eye(full.matrix.shape[0], dtype=torch.float64)
    for name, sl in full.slices.items():
        pad = padding_entries(model.get_submodule(name))
        if pad is not None:  # curvlinops' forward-mode J sees the padding row (PyTorch's
            index = torch.arange(sl.start, sl.stop)[pad]  # backward, hence the Fisher, does not)
            assert not full.matrix[index].any() and not full.matrix[:, index].any()
            dense[index], dense[:, index] = 0, 0
    assert rel_err(full.matrix, dense) <= EXACT
    for name, block in blocks.items():
        assert rel_err(block.to_dense(), full.block(name)) <= EXACT, name


def padding_entries(module):
    """The parameter-order entries of an Embedding's ``padding_idx`` row (``None``: none)."""
    if not isinstance(module, nn.Embedding) or module.padding_idx is None:
        return None
    mask = torch.zeros(module.weight.shape, dtype=torch.bool)
    mask[module.padding_idx] = True
    return mask.flatten()


# ------------------------------------------------------------------------ every method
@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_every_layer_in_parameter_order(case, method):
    problem = _problem(case, "true")
    curv = fl.curvature(method, problem)
    assert set(curv) == set(problem.layers) and not curv.missing
    v = torch.randn(max(b.size for b in curv.values()), 2, dtype=torch.float64)
    for name, block in curv.items():
        dense, rhs = block.to_dense(), v[: block.size]
        assert rel_err(block.matvec(rhs), dense @ rhs) <= EXACT, name
        eye = torch.eye(block.size, dtype=torch.float64)
        solved = torch.linalg.solve(dense + 0.1 * eye, rhs)
        assert rel_err(block.solve(rhs, damping=0.1), solved) <= 1e-8, name
        values = torch.linalg.eigvalsh(dense)
        assert rel_err(block.eigvalsh(), values) <= 1e-8, name


def _scale_shift_layers(problem):
    return [n for n, layer in problem.layers.items() if layer.layer_kind == "scale_shift"]


@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", ["kfac", "ekfac", "skfac"])
@pytest.mark.parametrize("scale_shift", ["diagonal", "full"])
def test_kronecker_methods_give_scale_and_shift_blocks(case, method, scale_shift):
    problem = _problem(case, "true")
    exact = fl.curvature("exact", problem)
    curv = fl.curvature(method, problem, scale_shift=scale_shift)
    names = _scale_shift_layers(problem)
    assert names
    for name in names:
        block, reference = curv[name], exact[name].to_dense()
        assert block.method == method
        if scale_shift == "full":
            assert type(block) is ScaleAndShiftFull and block.is_exact
            assert rel_err(block.to_dense(), reference) <= EXACT, name
        else:
            assert type(block) is ScaleAndShiftDiagonal and not block.is_exact
            assert rel_err(block.to_dense(), torch.diag(reference.diagonal())) <= EXACT, name


def test_scale_shift_option_is_checked():
    with pytest.raises(fl.FisherlabError, match="scale_shift"):
        fl.blocks.parse_method("kfac:scale_shift=dense")


def test_scale_and_shift_rows_in_parameter_order():
    """``[γ…, β…]`` of a LayerNorm over two trailing dimensions, against autograd."""
    norm = randomise_norm_layers(nn.LayerNorm([2, 3]).double())
    x = torch.randn(4, 5, 2, 3, dtype=torch.float64)  # 5 positions per sample
    adapter = adapter_for(norm)
    A = adapter.inputs(norm, x)
    g = torch.randn(4, 5, 2, 3, dtype=torch.float64)
    rows = adapter.gradient_rows(norm, A, adapter.output_rows(norm, g))  # [N, 6, 2]
    layer = fl.layers.Layer("norm", norm, adapter)
    for n in range(4):
        expected = torch.autograd.grad((norm(x[n : n + 1]) * g[n : n + 1]).sum(), norm.weight)
        expected = torch.cat([expected[0].flatten(), g[n].sum(0).flatten()])
        assert rel_err(layer.to_param_order(rows[n]), expected) <= EXACT


# ------------------------------------------------------------- configurations, train mode
def test_layernorm_without_bias_and_without_parameters():
    model = nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5, bias=False), nn.LayerNorm(5, elementwise_affine=False)
    )
    model = randomise_norm_layers(nn.Sequential(*model, nn.Linear(5, 3)).double())
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    blocks = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    assert set(blocks) == {"0", "1", "3"}  # no parameters: not a layer
    assert blocks["1"].shape == (5, 5)
    g = per_sample_grads(model, nn.CrossEntropyLoss(), x, y, "1")
    assert rel_err(blocks["1"], g.T @ g / 4) <= EXACT


def test_batchnorm_without_running_statistics_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False))
    model = nn.Sequential(*model, nn.Linear(5, 3)).double().eval()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(fl.UnsupportedLayerError, match=r"'1' \(BatchNorm1d\).*track_running"):
        fl.Problem(model, nn.CrossEntropyLoss(), (x, y))


def test_batchnorm_in_training_mode_is_refused_for_the_per_sample_fisher():
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(fl.FisherlabError, match=r"'1'.*training mode.*model\.eval\(\)"):
        fl.curvature("kfac", model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 3), (6, 5, 2, 3)], ids=["1d", "1d-seq", "2d"])
def test_batchnorm_in_training_mode_reads_the_batch_normalised_input(dims):
    """The documented choice where training-mode statistics are read (an optimizer's recorder):
    an affine map of the batch-normalised input, statistics held constant. The rows then sum to
    the exact batch gradient of γ and β, and the running statistics are left alone."""
    norm = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(dims)](5).double()
    norm = randomise_norm_layers(norm).train()
    running = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(*dims, dtype=torch.float64)
    adapter = adapter_for(norm)
    A = adapter.inputs(norm, x)
    assert torch.equal(norm.running_mean, running[0]) and torch.equal(norm.running_var, running[1])
    mean = x.transpose(0, 1).reshape(5, -1).mean(1)
    var = x.transpose(0, 1).reshape(5, -1).var(1, unbiased=False)
    shape = (1, 5) + (1,) * (len(dims) - 2)
    x_hat = (x - mean.view(shape)) / (var.view(shape) + norm.eps).sqrt()
    assert rel_err(A, adapter.layout(norm, x_hat)) <= EXACT
    g = torch.randn(*dims, dtype=torch.float64)
    rows = adapter.gradient_rows(norm, A, adapter.output_rows(norm, g))  # [N, 5, 2]
    expected = torch.autograd.grad((norm(x) * g).sum(), [norm.weight, norm.bias])
    assert rel_err(rows.sum(0), torch.stack(expected, dim=-1)) <= EXACT


# ------------------------------------------------------------------------ the table
def test_a_method_without_a_block_for_a_layer_kind_is_refused_by_name(monkeypatch):
    monkeypatch.delitem(BLOCK_TABLE, ("kfac", "scale_shift"))
    problem = _problem(LAYER_TYPE_CASES[0], "true")
    with pytest.raises(
        fl.UnsupportedLayerError,
        match=r"'kfac' has no block for layer '1' \(BatchNorm2d\); methods with a block for it: "
        r"diag, ekfac, exact, skfac, woodbury",
    ):
        fl.curvature("kfac", problem)
    curv = fl.blocks.curvatures(problem, ["kfac"], missing="skip")["kfac"]
    assert set(curv.missing) == set(_scale_shift_layers(problem))
    assert set(curv) | set(curv.missing) == set(problem.layers)


def test_compare_reports_missing_layers_as_rows_with_their_reason(monkeypatch):
    monkeypatch.delitem(BLOCK_TABLE, ("kfac", "scale_shift"))
    problem = _problem(LAYER_TYPE_CASES[2], "true")
    rows = fl.compare(problem, methods=["kfac", "diag"], progress=False)
    kfac = {r["layer"]: r for r in rows if r["method"] == "kfac"}
    assert set(kfac) == set(problem.layers)
    assert "has no block for layer '1' (GroupNorm)" in kfac["1"]["note"]
    assert kfac["0"]["note"] == "" and kfac["0"]["rel_frobenius"] >= 0


# ------------------------------------------------------------------------ the ResNet
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_resnet_passes_verify_with_every_parameter(fisher_type):
    case = LAYER_TYPE_CASES[0]
    problem = _problem(case, fisher_type, n=4)
    covered = {id(p) for layer in problem.layers.values() for p in layer.parameters()}
    assert covered == {id(p) for p in problem.model.parameters()}
    checks = verify_problem(problem, label=case.name)
    ekfac = [c for c in checks if c.check == "ekfac<=kfac"]
    assert {c.layer for c in ekfac} == set(problem.layers)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_resnet_compares_every_layer_and_method():
    problem = _problem(LAYER_TYPE_CASES[0], "true", n=4)
    rows = fl.compare(problem, progress=False)
    methods = fl.comparison.DEFAULT_METHODS
    assert len(rows) == len(problem.layers) * len(methods)
    assert all(r["note"] == "" for r in rows)
    for r in rows:
        assert r["rel_frobenius"] >= 0 and r["direction_cosine"] == r["direction_cosine"], r


# ------------------------------------------------------------------------ weighted builders
def _captures(case):
    model, loss_fn, x, y = case.build(9, seed=1)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    problem = fl.Problem(model, loss_fn, batches, fisher_type="true")
    return problem, list(captures(problem, quiet=True))


@pytest.mark.parametrize("case", LAYER_TYPE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("spec", ["exact", "diag", "woodbury", "kfac", "ekfac:scale_shift=full"])
def test_running_averages_are_averages_of_batch_blocks(case, spec):
    """``add(stats, old, new)`` on the new layer types: (0, 1) then (0.7, 0.3) per batch."""
    problem, caps = _captures(case)
    method, options = fl.blocks.parse_method(spec)
    for name, layer in problem.layers.items():
        if method in ("kfac", "ekfac") and layer.layer_kind != "scale_shift":
            continue  # Kronecker blocks average their factors, not their blocks
        b = fl.blocks.builder(method, layer, "true", normalise="batch", **options)
        for k, cap in enumerate(caps):
            b.add(LayerStats.of(cap, name), 0.0 if k == 0 else 0.7, 1.0 if k == 0 else 0.3)
        per_batch = [
            fl.blocks.build(method, cap, names=[name], **options)[name].to_dense() for cap in caps
        ]
        expected = 0.7 * per_batch[0] + 0.3 * per_batch[1]
        assert rel_err(b.block().to_dense(), expected) <= 1e-12, name
        restored = fl.blocks.builder(method, layer, "true", normalise="batch", **options)
        restored.load_state_dict(b.state_dict())
        assert torch.equal(restored.block().to_dense(), b.block().to_dense()), name
