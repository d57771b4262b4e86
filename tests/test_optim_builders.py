"""Optimizers hold builders: KFAC/EKFAC steps against the builders driven by hand, SKFAC against
the dense damped solve of its averaged rows, stat_every."""

import copy
import functools
import io

import pytest
import torch
from helpers import EXACT, rel_err
from torch import nn

import fisherlab as fl
from fisherlab.blocks import LayerStats, builder
from fisherlab.blocks.ekfac import EKFACBuilder
from fisherlab.blocks.kfac import KFACBuilder
from fisherlab.blocks.skfac import SKFACBuilder, skfac_rows

LR, DAMPING, DECAY = 0.1, 1e-2, 0.8
LAYERS = ("0", "2")
CNN_LAYERS = ("0", "3")


def _model(kind="mlp", seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    ).double()


def _batches(kind="mlp", count=7):
    """Batches with more samples than inputs of each layer: full-rank factors, whose
    eigenbasis is unique up to rounding (a stale basis in a null space is not: DESIGN.md)."""
    n = 8 if kind == "mlp" else 40
    g = torch.Generator().manual_seed(3)
    shape = (n, 5) if kind == "mlp" else (n, 1, 4, 4)
    return [
        (
            torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(count)
    ]


def _weights(first):
    return (0.0, 1.0) if first else (DECAY, 1.0 - DECAY)


def _layer_params(model, name):
    module = model.get_submodule(name)
    return [module.weight, module.bias]


def _by_hand(method, kind, batches, stat_every, interval, mode="eigen"):
    """The optimizer's schedule with ``fisherlab.blocks.builder`` and plain autograd.

    Statistics (a capture of the step's batch) are added only at steps ``k·stat_every``; the
    basis (KFAC: the block whose eigenbasis or inverses are kept; EKFAC: ``update_basis``)
    is renewed every ``interval`` steps; each step solves with the kept block.
    """
    model, loss_fn = _model(kind), nn.CrossEntropyLoss()
    builders, kept = {}, {}
    layers = LAYERS if kind == "mlp" else CNN_LAYERS
    for step, (x, y) in enumerate(batches):
        cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
        stat_step = step % stat_every == 0
        for name in layers:
            if name not in builders:
                opts = {"damping_mode": mode} if method == "kfac" else {}
                kind_of = "kfac" if method == "kfac" else "ekfac"
                builders[name] = builder(kind_of, cap[name].layer, "empirical", "batch", **opts)
            b, stats = builders[name], LayerStats.of(cap, name)
            if method == "kfac":
                if stat_step:
                    b.add(stats, *_weights(step == 0))
                if step % interval == 0:
                    kept[name] = b.block()
            else:
                if stat_step:
                    b.add_factors(stats, *_weights(step == 0))
                new_basis = step % interval == 0
                if new_basis:
                    b.update_basis()
                if stat_step:
                    running = method == "ekfac-ra" and not new_basis
                    b.add_scalings(stats, *((DECAY, 1 - DECAY) if running else (0.0, 1.0)))
                kept[name] = b.block()
        model.zero_grad()
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for name in layers:
                params = _layer_params(model, name)
                grad = torch.cat([p.grad.flatten() for p in params])
                direction = kept[name].solve(grad, DAMPING)
                offset = 0
                for p in params:
                    p -= LR * direction[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
    return model


def _optimizer(method, model, stat_every, interval, mode="eigen", **kw):
    common = dict(lr=LR, damping=DAMPING, stat_decay=DECAY, stat_every=stat_every, **kw)
    if method == "skfac":  # no inverse interval: the rows' eigenpairs at each statistics step
        return fl.optim.SKFAC(model, damping_mode=mode, **common)
    if method == "kfac":
        return fl.optim.KFAC(model, inv_update_freq=interval, damping_mode=mode, **common)
    ekfac = fl.optim.EKFACra if method == "ekfac-ra" else fl.optim.EKFAC
    return ekfac(model, basis_update_freq=interval, **common)


def _run(opt, model, batches):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


CASES = {
    "kfac-every-step": ("kfac", "eigen", 1, 2),
    "kfac-every-2": ("kfac", "eigen", 2, 4),
    "kfac-factored-every-3": ("kfac", "factored", 3, 3),
    "ekfac-every-2": ("ekfac", "eigen", 2, 4),
    "ekfac-ra-every-2": ("ekfac-ra", "eigen", 2, 2),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_steps_equal_the_builders_driven_by_hand(case, kind):
    method, mode, stat_every, interval = case
    batches = _batches(kind)
    reference = _by_hand(method, kind, batches, stat_every, interval, mode)
    model = _model(kind)
    opt = _optimizer(method, model, stat_every, interval, mode)
    _run(opt, model, batches)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) <= EXACT, n
    kinds = {"kfac": KFACBuilder, "ekfac": EKFACBuilder, "ekfac-ra": EKFACBuilder}
    layers = LAYERS if kind == "mlp" else CNN_LAYERS
    assert all(isinstance(opt.builders[n], kinds[method]) for n in layers)
    opt.close()


def _dense_damped_solve(layer, gamma, omega, grad, mode):
    """``(Γ ⊗ Ω + λI)⁻¹ g`` (``"eigen"``) or ``((Γ + √λ/π I) ⊗ (Ω + π√λ I))⁻¹ g``, dense."""
    eye = functools.partial(torch.eye, dtype=torch.float64)
    if mode == "factored":
        d_out, d = len(gamma), len(omega)
        pi = ((omega.trace() / d) / (gamma.trace() / d_out)).sqrt()
        root = DAMPING**0.5
        matrix = torch.kron(gamma + root / pi * eye(d_out), omega + pi * root * eye(d))
    else:
        matrix = torch.kron(gamma, omega) + DAMPING * eye(len(gamma) * len(omega))
    index = layer.kron_to_param_index()
    return torch.linalg.solve(matrix[index][:, index], grad)


def _skfac_by_hand(kind, batches, stat_every, mode="eigen", reduction="sum", micro=1):
    """SKFAC written out: raw factor rows at statistics steps, ``X ← lerp(X_b, X, decay)`` (set
    at the first one and when the batch size changes), ``Γ = YᵀY/ν``, ``Ω = XᵀX/S``, and each
    step the dense damped solve of ``Γ ⊗ Ω`` (``micro`` micro-batches per step, losses
    divided: the statistics are the whole batch's)."""
    model, loss_fn = _model(kind), nn.CrossEntropyLoss()
    rows, factors = {}, {}
    layers = LAYERS if kind == "mlp" else CNN_LAYERS
    for step, (x, y) in enumerate(batches):
        if step % stat_every == 0:
            cap = fl.capture(model, loss_fn, x, y, fisher_type="empirical")
            for name in layers:
                X, Y = skfac_rows(cap[name].A, cap[name].G, reduction, 3, step)
                if name in rows and rows[name][0].shape == X.shape:
                    X, Y = (torch.lerp(new, old, DECAY) for new, old in zip((X, Y), rows[name]))
                rows[name] = (X, Y)
                factors[name] = (Y.T @ Y / cap.normaliser, X.T @ X / X.shape[0])
        model.zero_grad()
        for part in torch.arange(len(x)).chunk(micro):
            (loss_fn(model(x[part]), y[part]) / micro).backward()
        with torch.no_grad():
            for name in layers:
                params = _layer_params(model, name)
                grad = torch.cat([p.grad.flatten() for p in params])
                layer = cap[name].layer
                direction = _dense_damped_solve(layer, *factors[name], grad, mode)
                offset = 0
                for p in params:
                    p -= LR * direction[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
    return model


def _uneven(kind):
    """Batches of 4 samples (MLP: fewer than the layers' inputs, low-rank factors) and one of 3
    at step 2 (the average restarts), CNN: of 40 and 20."""
    batches = _batches(kind, count=6)
    size, short = (4, 3) if kind == "mlp" else (40, 20)
    return [(x[: short if k == 2 else size], y[: short if k == 2 else size])
            for k, (x, y) in enumerate(batches)]  # fmt: skip


SKFAC_CASES = {
    "every-step": (1, "eigen", "sum"),
    "every-2": (2, "eigen", "sum"),
    "factored-every-3": (3, "factored", "sum"),
    "subsample-every-2": (2, "eigen", "subsample"),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("case", list(SKFAC_CASES.values()), ids=list(SKFAC_CASES))
def test_skfac_steps_are_the_dense_damped_solves_of_the_averaged_rows(case, kind):
    stat_every, mode, reduction = case
    batches = _uneven(kind)
    reference = _skfac_by_hand(kind, batches, stat_every, mode, reduction)
    model = _model(kind)
    extra = {"conv_reduction": "subsample", "spatial_samples": 3} if reduction != "sum" else {}
    opt = _optimizer("skfac", model, stat_every, None, mode, **extra)
    _run(opt, model, batches)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) <= EXACT, n
    layers = LAYERS if kind == "mlp" else CNN_LAYERS
    assert all(isinstance(opt.builders[n], SKFACBuilder) for n in layers)
    assert opt.skipped_steps == 0
    opt.close()


@pytest.mark.parametrize(
    "method, entries",
    [("kfac", {"builder.gg", "builder.aa"}), ("skfac", {"builder.X", "builder.Y"})],
)
def test_statistics_between_statistics_steps_are_not_used(method, entries):
    """Between statistics steps the factors stay the same tensors and nothing is recorded."""
    model = _model()
    opt = _optimizer(method, model, 3, 3)
    batches = _batches(count=3)
    _run(opt, model, batches[:1])
    held = {k: v for k, v in opt.layer_state["0"].items() if k.startswith("builder.")}
    assert set(held) >= entries
    for x, y in batches[1:]:
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
        assert opt._recorder.num_passes == 0
        assert all(opt.layer_state["0"][k] is v for k, v in held.items())
    opt.close()


@pytest.mark.parametrize("method", ["kfac", "ekfac", "ekfac-ra", "skfac"])
def test_resume_in_the_middle_of_an_interval_is_bit_identical(method):
    batches = _batches(count=7)
    model = _model()
    opt = _optimizer(method, model, 2, 4, momentum=0.9)
    _run(opt, model, batches[:3])  # step 3 is between statistics steps
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _run(opt, model, batches[3:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    again = _optimizer(method, resumed, 2, 4, momentum=0.9)
    again.load_state_dict(saved["opt"])
    _run(again, resumed, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for name in LAYERS:
        mine, theirs = opt.builders[name].state_dict(), again.builders[name].state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("method", ["kfac", "ekfac", "skfac"])
def test_state_dict_holds_the_builders_state_and_round_trips(method):
    model = _model()
    opt = _optimizer(method, model, 1, 2)
    _run(opt, model, _batches(count=3))
    state = opt.state_dict()
    layers = state["fisherlab"]["layers"]
    for name in LAYERS:
        live = opt.builders[name].state_dict()
        mirrored = {k.removeprefix("builder."): v for k, v in layers[name].items()
                    if k.startswith("builder.")}  # fmt: skip
        constants = {"pass_index", "per_batch", "generator", "average_rows"}  # (SKFAC's last two)
        assert mirrored.keys() == live.keys() - constants
        assert all(torch.equal(mirrored[k], live[k]) for k in mirrored)
    twin = copy.deepcopy(model)
    again = _optimizer(method, twin, 1, 2)
    again.load_state_dict(state)
    reloaded = again.state_dict()["fisherlab"]["layers"]
    for name in LAYERS:
        for key, value in layers[name].items():
            if torch.is_tensor(value):
                assert torch.equal(reloaded[name][key], value), (name, key)
    other = "ekfac" if method == "kfac" else "kfac"
    with pytest.raises(fl.FisherlabError, match="the state was saved by"):
        _optimizer(other, copy.deepcopy(model), 1, 2).load_state_dict(state)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda m: fl.optim.KFAC(m, stat_every=2, inv_update_freq=3),
            r"inv_update_freq=3 must be a multiple of stat_every=2",
        ),
        (
            lambda m: fl.optim.EKFAC(m, stat_every=4, basis_update_freq=6),
            r"basis_update_freq=6 must be a multiple of stat_every=4",
        ),
        (lambda m: fl.optim.KFAC(m, stat_every=0), r"stat_every must be a positive integer"),
        (lambda m: fl.optim.SKFAC(m, stat_every=1.5), r"stat_every must be a positive integer"),
        (lambda m: fl.optim.KFAC(m, factor_update_freq=2), r"has no argument\(s\)"),
    ],
    ids=["kfac-interval", "ekfac-interval", "zero", "skfac-fraction", "old-name"],
)
def test_bad_statistics_intervals_are_refused(make, message):
    with pytest.raises(fl.FisherlabError, match=message):
        make(_model())


def test_a_changed_interval_is_refused_at_the_step():
    model = _model()
    opt = _optimizer("kfac", model, 2, 4)
    _run(opt, model, _batches(count=1))
    opt.param_groups[0]["stat_every"] = 3
    with pytest.raises(fl.FisherlabError, match=r"param group 0: inv_update_freq=4 must be"):
        _run(opt, model, _batches(count=1))
    opt.close()


@pytest.mark.parametrize("method", ["kfac", "ekfac", "skfac"])
def test_accumulated_micro_batches_with_stat_every_equal_the_whole_batches(method):
    """Two halves per step, losses halved: the step of the whole batch (by hand)."""
    batches = _batches(count=5)
    if method == "skfac":
        reference = _skfac_by_hand("mlp", batches, 2)
    else:
        reference = _by_hand(method, "mlp", batches, 2, 2)
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    opt = _optimizer(method, model, 2, 2)
    for x, y in batches:
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            (loss_fn(model(x[half]), y[half]) / 2).backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) <= EXACT, n
    opt.close()


@pytest.mark.parametrize("method", ["kfac", "skfac"])
def test_grad_scaler_with_stat_every_takes_the_unscaled_steps(method):
    batches = [(x.float(), y) for x, y in _batches(count=5)]
    loss_fn = nn.CrossEntropyLoss()
    models = [_model().float(), _model().float()]
    opts = [_optimizer(method, m, 2, 4) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches:
        for model, opt, scaled in zip(models, opts, (False, True)):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            if scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    assert opts[1].skipped_steps == 0 and opts[1].steps == 5
    for p, q in zip(*(m.parameters() for m in models)):
        assert rel_err(q.detach(), p.detach()) < 1e-5


def test_nothing_is_recorded_between_statistics_steps_and_mc_draws_nothing():
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    opt = _optimizer("kfac", model, 2, 2, fisher_type="mc", loss_fn=loss_fn)
    passes = []
    for x, y in _batches(count=4):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        rng = torch.get_rng_state()
        opt.mc_backward()
        drew = not torch.equal(rng, torch.get_rng_state())
        loss.backward()
        passes.append((opt._recorder.num_passes, drew))
        opt.step()
    assert passes == [(1, True), (0, False), (1, True), (0, False)]
    assert opt.steps == 4 and opt.skipped_steps == 0
    opt.close()


def test_a_layer_added_between_statistics_steps_takes_statistics_at_once():
    model = _model()
    opt = fl.optim.KFAC(model, params=list(model[0].parameters()), lr=LR, stat_every=4,
                        inv_update_freq=4)  # fmt: skip
    batches = _batches(count=3)
    _run(opt, model, batches[:1])
    opt.add_param_group({"params": list(model[2].parameters())})
    _run(opt, model, batches[1:])
    assert opt.steps == 3 and opt.skipped_steps == 0
    assert "builder.gg" in opt.layer_state["2"]
    opt.close()


# ------------------------------------------------------------------ torch.distributed
DDP_MAKERS = {
    "kfac": lambda m: fl.optim.KFAC(m, lr=0.1, damping=0.1, stat_every=2, inv_update_freq=2),
    "skfac": lambda m: fl.optim.SKFAC(m, lr=0.1, damping=0.1, stat_every=2),
    "ekfac-ra": lambda m: fl.optim.EKFACra(
        m, lr=0.1, damping=0.1, stat_every=2, basis_update_freq=2
    ),
}


def _ddp_train(name, split=(16,), rank=0):
    """Five steps of 16 samples, rank ``r`` taking its part, gradients combined as the
    concatenated batch's (each rank's mean weighted by its share)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))
    model = model.double()
    x = torch.randn(5, 16, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 16))
    opt = DDP_MAKERS[name](model)
    local = slice(sum(split[:rank]), sum(split[: rank + 1]))
    for step in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step, local]), y[step, local]).backward()
        if len(split) > 1:
            for p in model.parameters():
                p.grad *= split[rank] / sum(split)
                torch.distributed.all_reduce(p.grad)
        opt.step()
    opt.close()
    return [p.detach().clone() for p in model.parameters()]


def _ddp_worker(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {name: _ddp_train(name, (4, 12), rank) for name in DDP_MAKERS}
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import sys

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or sys.platform == "win32":
        pytest.skip("needs gloo")
    tmp = tmp_path_factory.mktemp("stat_every")
    out = tmp / "ranks.pt"
    try:
        mp.spawn(_ddp_worker, args=(2, f"file://{tmp / 'init'}", str(out)), nprocs=2)
    except mp.ProcessExitedException:  # gloo may abort while tearing down (test_distributed)
        if not out.exists():
            raise
    return torch.load(out)


@pytest.mark.parametrize("name", list(DDP_MAKERS))
def test_ranks_with_stat_every_take_the_steps_of_the_concatenated_batch(ranks, name):
    single = _ddp_train(name)
    for p, q in zip(single, ranks[name]):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda layer: layer.update(gamma=layer.pop("builder.gg")),
            r"state of layer '0' holds entries \['gamma'\] that KFAC does not keep",
        ),
        (
            lambda layer: layer.update({"builder.gg": torch.zeros(4, 4, dtype=torch.float64)}),
            r"the saved 'gg' of layer '0' has shape \(4, 4\), the layer needs \(6, 6\)",
        ),
    ],
    ids=["earlier-format", "wrong-shape"],
)
def test_a_state_the_builders_cannot_continue_is_refused(edit, message):
    model = _model()
    opt = _optimizer("kfac", model, 1, 2)
    _run(opt, model, _batches(count=2))
    state = opt.state_dict()
    edit(state["fisherlab"]["layers"]["0"])
    again = _optimizer("kfac", copy.deepcopy(model), 1, 2)
    with pytest.raises(fl.FisherlabError, match=message):
        again.load_state_dict(state)
    assert again.steps == 0 and again.layer_state["0"] == {}


def test_an_skfac_state_of_the_former_format_is_refused_by_name():
    """The former SKFAC kept its raw average rows as ``X``, ``Y``: without the batches' ``ν``
    they cannot be converted into the builder's normalised rows."""
    model = _model()
    opt = _optimizer("skfac", model, 1, None)
    _run(opt, model, _batches(count=2))
    state = opt.state_dict()
    for layer in state["fisherlab"]["layers"].values():
        rows = {k.removeprefix("builder."): layer.pop(k) for k in list(layer)}
        layer.update(X=rows["X"], Y=rows["Y"])
    again = _optimizer("skfac", copy.deepcopy(model), 1, None)
    with pytest.raises(fl.FisherlabError, match=r"holds entries \['X', 'Y'\] that SKFAC does not"):
        again.load_state_dict(state)
    assert again.steps == 0 and again.layer_state["0"] == {}
