"""Nothing lost, nothing silent: passes that must agree do, parameters used outside their
module's call, memory pre-flights of the peak, overflowing statistics, integer inputs.

Each test is a small version of a probe of issue 22, with the probe's setting.
"""

import pytest
import torch
from helpers import rel_err
from torch import nn

import fisherlab as fl

METHODS = ["exact", "woodbury", "kfac", "ekfac", "skfac", "diag"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n=18):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


class _Augmented(torch.utils.data.Dataset):
    """A data set with random augmentation: each access adds fresh noise."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def _loader(kind, batch_size=4):
    x, y = _data()
    if kind == "augmented":
        return torch.utils.data.DataLoader(_Augmented(x, y), batch_size=batch_size)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=kind == "shuffle-drop-last"
    )


def _problem(kind, fisher_type="true", cache_bytes=0):
    return fl.Problem(
        _mlp(),
        nn.CrossEntropyLoss(),
        _loader(kind),
        fisher_type=fisher_type,
        cache_bytes=cache_bytes,
    )


CHANGED = r"data changed between passes.*other samples.*shuffle=False.*cache_bytes"
CHANGING = ["shuffle-drop-last", "augmented"]


# ------------------------------------------------------------------ passes that must agree
@pytest.mark.parametrize("kind", CHANGING)
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_exact_blocks_then_curvature_on_changing_data_is_refused(kind, fisher_type):
    problem = _problem(kind, fisher_type)
    fl.exact_blocks(problem)
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.curvature("exact", problem)


@pytest.mark.parametrize("kind", CHANGING)
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_ekfac_second_pass_without_cache_on_changing_data_is_refused(kind, fisher_type):
    with pytest.raises(fl.FisherlabError, match="data changed between passes"):
        fl.curvature("ekfac", _problem(kind, fisher_type))


@pytest.mark.parametrize("kind", CHANGING)
def test_compare_on_changing_data_is_refused(kind):
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.compare(_problem(kind), methods=["kfac"], progress=False)


@pytest.mark.parametrize("kind", CHANGING)
def test_one_ekfac_call_replaying_its_first_pass_is_accepted(kind):
    """The second pass replays the first's captures from memory: one data set, the first's."""
    problem = _problem(kind, cache_bytes=2**20)
    ekfac = fl.curvature("ekfac", problem)
    assert problem._passes_started == 1
    assert ekfac["0"].to_dense().isfinite().all()


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_a_reshuffled_loader_without_drop_last_is_accepted_and_exact(fisher_type):
    """The same samples in another order: the same Fisher (a sum over samples)."""
    problem = _problem("shuffle", fisher_type)
    blocks = fl.exact_blocks(problem)
    curv = fl.curvature("exact", problem)
    ekfac = fl.curvature("ekfac", problem)  # two more passes, reshuffled each
    x, y = _data()
    whole = fl.exact_blocks(_mlp(), nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type)
    for name in blocks:
        assert rel_err(blocks[name], whole[name]) <= 1e-12
        assert rel_err(curv[name].to_dense(), whole[name]) <= 1e-12
    assert ekfac["0"].to_dense().isfinite().all()


def test_a_reshuffled_loader_is_still_refused_for_monte_carlo():
    problem = _problem("shuffle", "mc")
    fl.exact_blocks(problem)
    with pytest.raises(fl.FisherlabError, match=r"same batches in the same order.*shuffle=False"):
        fl.exact_blocks(problem)


class _RecordingShuffle(torch.utils.data.Sampler):
    """A fresh random order on every pass (as ``shuffle=True``), remembering each pass's."""

    def __init__(self, n):
        self.n, self.orders = n, []
        self.generator = torch.Generator().manual_seed(5)

    def __len__(self):
        return self.n

    def __iter__(self):
        self.orders.append(torch.randperm(self.n, generator=self.generator))
        return iter(self.orders[-1].tolist())


def _mc_shuffled(**kwargs):
    x, y = _data()
    sampler = _RecordingShuffle(len(x))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, sampler=sampler
    )
    return fl.Problem(_mlp(), nn.CrossEntropyLoss(), loader, fisher_type="mc", **kwargs), sampler


def test_one_monte_carlo_ekfac_call_on_a_reshuffled_loader_with_the_default_cache_is_exact():
    """The README's "when": one call whose captures fit the default ``cache_bytes`` replays its
    first pass, so its two passes see the same batches: the EKFAC of that pass's order."""
    problem, sampler = _mc_shuffled()
    assert problem.cache_bytes == fl.conventions.DEFAULT_CACHE_BYTES
    ekfac = fl.curvature("ekfac", problem)
    assert len(sampler.orders) == 1  # the second pass replayed the first
    x, y = _data()
    order = sampler.orders[0]
    batches = [(x[order[i : i + 4]], y[order[i : i + 4]]) for i in range(0, len(x), 4)]
    same = fl.curvature("ekfac", fl.Problem(_mlp(), nn.CrossEntropyLoss(), batches, "mc"))
    for name in ekfac:
        assert rel_err(ekfac[name].to_dense(), same[name].to_dense()) <= 1e-12, name


@pytest.mark.parametrize(
    "kwargs", [{"cache_bytes": 0}, {"cache_bytes": 512}], ids=["no-cache", "cache-too-small"]
)
def test_one_monte_carlo_ekfac_call_on_a_reshuffled_loader_without_replay_is_refused(kwargs):
    problem, sampler = _mc_shuffled(**kwargs)
    with pytest.raises(fl.FisherlabError, match=r"same batches in the same order.*cache_bytes"):
        fl.curvature("ekfac", problem)
    assert len(sampler.orders) == 2


def test_a_second_monte_carlo_call_on_a_reshuffled_loader_is_refused_whatever_the_cache():
    problem, _ = _mc_shuffled()
    fl.curvature("ekfac", problem)
    with pytest.raises(fl.FisherlabError, match=r"same batches in the same order"):
        fl.curvature("kfac", problem)


def test_checksums_see_a_swap_of_targets_between_samples():
    """The same inputs and the same labels, paired differently, are other samples."""
    x, y = _data(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    swapped = y.clone()
    swapped[[0, 1]] = swapped[[1, 0]]

    class SecondPassSwapped:
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([(x, y if self.passes == 1 else swapped)])

    problem = fl.Problem(_mlp(), nn.CrossEntropyLoss(), SecondPassSwapped())
    fl.curvature("kfac", problem)
    with pytest.raises(fl.FisherlabError, match=CHANGED):
        fl.curvature("kfac", problem)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("entry", ["exact_blocks", "curvature", "capture"])
def test_integer_inputs_to_a_float_model_are_one_clear_error(entry):
    x, y = _data(6)
    call = {
        "exact_blocks": fl.exact_blocks,
        "curvature": lambda *a: fl.curvature("kfac", *a),
        "capture": fl.capture,
    }[entry]
    with pytest.raises(
        fl.FisherlabError, match=r"inputs have dtype torch.int64 .* torch.float64.*inputs.to"
    ):
        call(_mlp(), nn.CrossEntropyLoss(), x.long(), y)


# ------------------------------------------------- parameters used outside their module's call
class _Functional(nn.Module):
    """``out.weight`` is also used functionally: ``h @ out.weight.T`` beside ``out(h)``."""

    def __init__(self, how):
        super().__init__()
        self.inp, self.out, self.how = nn.Linear(4, 5), nn.Linear(5, 3), how

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.how == "matmul":
            return self.out(h) + 0.5 * h @ self.out.weight.T
        return self.out(h) + nn.functional.linear(h.flip(1), self.out.weight)


@pytest.mark.parametrize("how", ["matmul", "functional-linear"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fisher_type", ["true", "mc", "empirical"])
def test_a_parameter_used_outside_its_module_is_refused_by_name(method, how, fisher_type):
    torch.manual_seed(0)
    model = _Functional(how).double()
    x, y = _data(8)
    with pytest.raises(
        fl.FisherlabError, match=r"parameters 'out.weight' \(.*\) are also used outside"
    ):
        fl.curvature(method, model, nn.CrossEntropyLoss(), x, y, fisher_type=fisher_type)


def test_capture_of_a_parameter_used_outside_its_module_is_refused():
    torch.manual_seed(0)
    x, y = _data(8)
    problem = fl.Problem(_Functional("matmul").double(), nn.CrossEntropyLoss(), [(x, y)] * 2)
    with pytest.raises(fl.FisherlabError, match=r"'out.weight'.*fl.exact_blocks"):
        fl.capture(problem)


def test_exact_blocks_differentiate_the_functional_use():
    """The alternative the refusal names is right: ``exact_blocks`` sees every use."""
    torch.manual_seed(0)
    model = _Functional("matmul").double()
    x, y = _data(8)
    blocks = fl.exact_blocks(
        model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical", backend="torch.func"
    )
    params = dict(model.named_parameters())

    def loss(w, b, xn, yn):
        out = torch.func.functional_call(model, {**params, "out.weight": w, "out.bias": b}, (xn,))
        return nn.functional.cross_entropy(out, yn, reduction="sum")

    gw, gb = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        params["out.weight"], params["out.bias"], x.unsqueeze(1), y.unsqueeze(1)
    )
    rows = torch.cat([gw.flatten(1), gb.flatten(1)], dim=1)
    assert rel_err(blocks["out"], rows.T @ rows / len(x)) <= 1e-12


@pytest.mark.parametrize(
    "case_name",
    [
        "mlp-relu-nobias-ce",
        "cnn-stride-pad-ce",
        "cnn-dilation-mse",
        "seq-linear-ce",
        "residual-mse",
    ],
)
def test_float32_models_are_not_refused_by_the_module_call_check(case_name):
    """No false alarm from float32 rounding: the check compares within rounding of Σ‖j_n‖."""
    from cases import CASES

    case = next(c for c in CASES if c.name == case_name)
    model, loss_fn, x, y = case.build(16, 0)
    model = model.float()
    y = y.float() if y.is_floating_point() else y
    cap = fl.capture(model, loss_fn, x.float(), y, fisher_type="true")
    assert all(lc.G.shape[0] == next(iter(cap.values())).G.shape[0] for lc in cap.values())


# ------------------------------------------------------------------- overflowing statistics
@pytest.mark.parametrize("method", METHODS)
def test_a_huge_float32_sample_is_refused_alike_by_every_method(method):
    """Probe: one finite sample at 1e22 in float32 (its squares overflow)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    x[3, 1] = 1e22
    with pytest.raises(
        fl.FisherlabError, match=r"statistics of layer '0' overflow torch.float32.*float64"
    ):
        fl.curvature(method, model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("method", METHODS)
def test_the_same_sample_in_float64_is_finite_for_every_method(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    x[3, 1] = 1e22
    block = fl.curvature(method, model, nn.CrossEntropyLoss(), x, y)["0"]
    assert block.to_dense().isfinite().all()


@pytest.mark.parametrize("entry", ["exact_blocks", "exact_fisher"])
def test_exact_blocks_that_overflow_are_refused(entry):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    x[3, 1] = 1e15  # MSE gradient rows ~1e30: their squares overflow float32
    call = getattr(fl, entry)
    with pytest.raises(fl.FisherlabError, match=r"exact .* overflows? torch.float32.*float64"):
        call(nn.Sequential(nn.Linear(4, 3)), nn.MSELoss(), x, y, fisher_type="empirical")


def test_statistics_are_checked_over_the_data_set_not_per_batch():
    """One batch's sums fit float32; those of four such batches may not."""
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.full((8, 4), 5e17), torch.zeros(8, 3)  # |g| = √2 (true MSE rows), P = 15
    one = fl.curvature("kfac", fl.Problem(model, nn.MSELoss(), [(x, y)]))  # bound 1.8e38
    assert one["0"].to_dense().isfinite().all()
    with pytest.raises(fl.FisherlabError, match=r"overflow torch.float32: .* over 16 samples"):
        fl.curvature("kfac", fl.Problem(model, nn.MSELoss(), [(x, y)] * 4))


# ------------------------------------------------------------------ memory pre-flights
@pytest.mark.parametrize("backend", ["backpack", "torch.func"])
@pytest.mark.parametrize("entry", ["exact_blocks", "exact_fisher"])
def test_exact_rows_are_preflighted_beside_the_blocks(entry, backend):
    """Probe: Linear(15, 1000), one batch of 128, 2 GiB: the ~1 GiB block fits, its 16 GiB of
    rows do not; refused before any row (or block) is allocated, with the batch size that fits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(15, 1000))
    x, y = torch.randn(128, 15), torch.randint(0, 1000, (128,))
    with pytest.raises(
        fl.MemoryBudgetError,
        match=r"gradient rows of batch 0 \(1000 per sample × 128 samples × 16000 parameters"
        r".*needs 16.2\d GiB.*2.00 GiB.*batches of at most 8 samples",
    ):
        getattr(fl, entry)(model, nn.CrossEntropyLoss(), x, y, backend=backend, max_bytes=2 * 2**30)


def test_exact_rows_that_fit_in_smaller_batches_give_the_same_blocks():
    """The alternative the refusal names: the same data in batches of at most that size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 4, (12,))
    block = 16 * 16 * 8
    rows_per_sample = 2 * 4 * 16 * 8  # R = 4 rows, P = 16, twice
    budget = block + 4 * rows_per_sample
    with pytest.raises(fl.MemoryBudgetError, match="batches of at most 4 samples"):
        fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y, max_bytes=budget)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    split = fl.exact_blocks(fl.Problem(model, nn.CrossEntropyLoss(), batches), max_bytes=budget)
    whole = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    assert rel_err(split["0"], whole["0"]) <= 1e-12


class _Images(torch.utils.data.Dataset):
    """Images made on demand (nothing held): ``n`` of 3×8×8, labels ``i mod 10``."""

    def __init__(self, n):
        self.n, self.made = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.made += 1
        return torch.cos(torch.arange(192.0) * (i + 1)).reshape(3, 8, 8), i % 10


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


def test_capture_of_many_batches_is_estimated_before_it_is_kept():
    """Probe (smaller): 200 batches; refused after capturing the first, with the size."""
    images = _Images(200 * 16)
    loader = torch.utils.data.DataLoader(images, batch_size=16)
    problem = fl.Problem(_cnn(), nn.CrossEntropyLoss(), loader, fisher_type="empirical")
    one = fl.capture(
        fl.Problem(_cnn(), nn.CrossEntropyLoss(), next(iter(loader)), fisher_type="empirical")
    )
    need = 2 * one.nbytes * 200
    with pytest.raises(
        fl.MemoryBudgetError,
        match=rf"captures of all 3200 samples .* needs {fl.conventions.format_bytes(need)}.*"
        r"fl.curvature",
    ):
        fl.capture(problem, max_bytes=need // 10)
    assert images.made == 16 + 16  # the batch above and one batch of the refused pass


def test_capture_of_many_batches_within_the_budget_is_the_concatenation():
    loader = torch.utils.data.DataLoader(_Images(48), batch_size=16)
    cap = fl.capture(fl.Problem(_cnn(), nn.CrossEntropyLoss(), loader), max_bytes=2**24)
    assert cap.num_samples == 48 and cap["3"].G.shape == (10, 48, 1, 10)


def test_a_generator_capture_is_checked_as_it_grows():
    batches = ((x, y) for x, y in torch.utils.data.DataLoader(_Images(200 * 16), batch_size=16))
    problem = fl.Problem(_cnn(), nn.CrossEntropyLoss(), batches, fisher_type="empirical")
    with pytest.raises(fl.MemoryBudgetError, match=r"captures of the samples"):
        fl.capture(problem, max_bytes=2**20)


def test_a_cache_that_cannot_hold_the_pass_is_given_up_at_the_first_batch():
    from fisherlab.capture import cached_captures, captures

    loader = torch.utils.data.DataLoader(_Images(200 * 16), batch_size=16)
    problem = fl.Problem(_cnn(), nn.CrossEntropyLoss(), loader, fisher_type="empirical")
    one = fl.Problem(_cnn(), nn.CrossEntropyLoss(), next(iter(loader)), fisher_type="empirical")
    first = next(iter(captures(one)))
    with cached_captures(problem, max_bytes=50 * first.nbytes) as cached:
        passing = captures(cached)
        next(passing)
        assert cached._cache.too_large  # 200 batches estimated from one; none kept
        passing.close()


def test_a_one_batch_capture_is_preflighted_before_its_backward_passes():
    """True Fisher of 1,000 classes: 1,000 rows per sample of every layer's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(15, 64), nn.Tanh(), nn.Linear(64, 1000))
    x, y = torch.randn(128, 15), torch.randint(0, 1000, (128,))
    rows = (1000 + 1) * 128 * (64 + 1000) * 4  # and the loss gradient's row (first batch)
    inputs = 128 * (16 + 65) * 4
    with pytest.raises(
        fl.MemoryBudgetError,
        match=rf"capture of batch 0 .*1000 output-gradient rows per sample × 128 samples\) "
        rf"needs {fl.conventions.format_bytes(rows + inputs)}",
    ):
        fl.capture(model, nn.CrossEntropyLoss(), x, y, max_bytes=2**26)
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical", max_bytes=2**26)
    assert cap["2"].G.shape == (1, 128, 1, 1000)
