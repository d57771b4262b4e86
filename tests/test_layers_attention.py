"""``nn.MultiheadAttention``: its projections as Linear layers over tokens.

The recorded forward must equal the module's own (bit for bit, every supported argument), and
the blocks of ``attn`` (the input projection) and ``attn.out_proj`` must equal brute force
(the dense GGN / per-sample gradients of the parameters by ``torch.func``) over a data set of
two batches; KFAC equals curvlinops' KFAC of the same network written with ``nn.Linear``
projections.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    EXACT,
    PooledAttention,
    assert_unchanged,
    brute_force_ggn,
    model_snapshot,
    per_sample_grads,
    rel_err,
)
from torch import Tensor, nn
from torch.nn import functional as F

import fisherlab as fl
from fisherlab.capture import Recorder
from fisherlab.layers import find_layers

L, S, E, HEADS, D_IN, CLASSES = 3, 2, 4, 2, 3, 3


@dataclass(frozen=True)
class Config:
    """How the network calls its attention module."""

    name: str
    batch_first: bool = True
    attend: str = "self"  # "self", "kv" (key is value), "apart" (key, value different)
    need_weights: bool = False
    average: bool = True
    mask: str = ""  # "", "bool", "float3d", "causal"
    key_padding: bool = False
    bias: bool = True


CONFIGS = [
    Config("self"),
    Config("self-seq-first", batch_first=False),
    Config("weights-averaged", need_weights=True),
    Config("weights-per-head", need_weights=True, average=False, batch_first=False),
    Config("causal", mask="causal"),
    Config("causal-weights", mask="causal", need_weights=True),
    Config("cross-kv", attend="kv"),
    Config("cross-apart-seq-first", attend="apart", batch_first=False),
    Config("masks-bool", attend="kv", mask="bool", key_padding=True),
    Config("mask-float3d-padding", attend="apart", mask="float3d", key_padding=True),
    Config("weights-masks", attend="kv", mask="bool", key_padding=True, need_weights=True),
    Config("no-bias", bias=False),
]
IDS = [c.name for c in CONFIGS]


class AttentionNet(nn.Module):
    """Tokens ``[N, L, D_IN]`` → Linear embedding → attention → mean over positions → Linear."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(D_IN, E)
        self.memory = nn.Linear(D_IN, E) if config.attend != "self" else None
        self.attn = nn.MultiheadAttention(
            E, HEADS, batch_first=config.batch_first, bias=config.bias
        )
        self.head = nn.Linear(E, CLASSES)

    def attend(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        c, n = self.config, x.shape[0]
        query = torch.tanh(self.embed(x))
        if c.attend == "self":
            key = value = query
        else:
            key = torch.tanh(self.memory(x[:, :S]))
            value = key if c.attend == "kv" else torch.sin(key)
        length = L if c.attend == "self" else S
        kwargs = dict(need_weights=c.need_weights, average_attn_weights=c.average)
        if c.mask == "bool":
            kwargs["attn_mask"] = torch.tensor([[False, True], [False, False], [False, True]])
        elif c.mask == "float3d":  # per sample (from its own tokens), as masks must be
            mask = x[:, :L, :1] * x[:, :length, 1].unsqueeze(1)
            kwargs["attn_mask"] = mask.repeat_interleave(HEADS, dim=0)
        elif c.mask == "causal":
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L).double()
            kwargs["is_causal"] = True
        if c.key_padding:
            last = (x[:, 0, :1] > 0).expand(n, 1)  # the last key of some samples
            padding = torch.cat([torch.zeros(n, length - 1, dtype=torch.bool), last], dim=1)
            if c.mask == "float3d":  # of the attention mask's type
                padding = torch.zeros(n, length, dtype=torch.float64).masked_fill(padding, -1e9)
            kwargs["key_padding_mask"] = padding
        if not c.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
            value = key if c.attend != "apart" else value.transpose(0, 1)
            if c.attend == "self":
                key = value = query
        out, weights = self.attn(query, key, value, **kwargs)
        return (out if c.batch_first else out.transpose(0, 1)), weights

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attend(x)
        return self.head(out.mean(dim=1))


def _net(config: Config, seed: int = 0) -> AttentionNet:
    torch.manual_seed(seed)
    model = AttentionNet(config).double()
    with torch.no_grad():  # non-zero biases (PyTorch initialises them to zero)
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.3)
    return model.eval()


def _batches(seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, L, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,), generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


# ------------------------------------------------------------------------ the forward
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_recorded_forward_equals_the_module_bit_for_bit(config):
    model = _net(config)
    x = _batches()[0][0]
    with torch.enable_grad():
        out, weights = model.attend(x)
    layers = find_layers(model)
    with Recorder(model, layers, force_grad=True) as recorder:
        recorded_out, recorded_weights = model.attend(x)  # the model's pre-hook opens no pass
        assert recorder.num_passes == 0
        y = model(x)  # inside a pass: the attention's output is the re-run's
        assert {n for n, _ in recorder.layer_outputs()} == set(layers)
    assert torch.equal(recorded_out, out)
    assert torch.equal(y, model.head(out.mean(dim=1)))
    assert (weights is None) == (not config.need_weights)
    if config.need_weights:
        assert torch.equal(recorded_weights, weights)


def test_the_recorded_pass_returns_the_replayed_output_and_weights():
    """Inside a recorded pass the hook's output (a re-run) replaces the module's, equal to it."""
    config = Config("w", need_weights=True, average=False)
    model = _net(config)
    x = _batches()[0][0]
    seen = {}

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            seen["out"] = self.net.attend(x)
            return self.net.head(seen["out"][0].mean(1))

    outer = Outer()
    reference = model.attend(x)
    with Recorder(outer, find_layers(outer)) as recorder:
        outer(x)
        assert recorder.num_passes == 1
    assert torch.equal(seen["out"][0], reference[0])
    assert torch.equal(seen["out"][1], reference[1])
    assert seen["out"][1].shape == (4, HEADS, L, L)


# ------------------------------------------------------------------------- the blocks
def _all(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_blocks_equal_brute_force_over_two_batches(config, fisher_type):
    model, loss_fn, batches = _net(config), nn.CrossEntropyLoss(), _batches()
    x, y = _all(batches)
    before = model_snapshot(model)
    problem = fl.Problem(model, loss_fn, batches, fisher_type=fisher_type)
    memory = [] if config.attend == "self" else ["memory"]
    assert list(problem.layers) == ["embed", *memory, "attn", "attn.out_proj", "head"]
    exact = fl.exact_blocks(problem)
    recorded = fl.curvature("exact", problem)
    assert_unchanged(model, before)
    assert exact.backend == "torch.func"
    for name in ("attn", "attn.out_proj"):
        if fisher_type == "true":
            reference = brute_force_ggn(model, loss_fn, x, y, [name])
        else:
            grads = per_sample_grads(model, loss_fn, x, y, name)
            reference = grads.T @ grads / x.shape[0]
        assert rel_err(exact[name], reference) <= EXACT, name
        assert rel_err(recorded[name].to_dense(), reference) <= EXACT, name


@pytest.mark.parametrize("config", CONFIGS[::3], ids=IDS[::3])
def test_monte_carlo_blocks_of_both_paths_agree(config):
    problem = fl.Problem(
        _net(config), nn.CrossEntropyLoss(), _batches(), fisher_type="mc", mc_samples=2
    )
    exact = fl.exact_blocks(problem)
    recorded = fl.curvature("exact", problem)
    for name in ("attn", "attn.out_proj"):
        assert rel_err(recorded[name].to_dense(), exact[name]) <= EXACT, name


def test_the_captured_inputs_are_the_tokens_and_the_heads_output():
    """``A`` of the input projection: the query tokens; of ``out_proj``: the heads' output,
    rebuilt from the module's own per-head attention weights (need_weights, not averaged)."""
    config = Config("apart", attend="apart", need_weights=True, average=False)
    model, (x, y) = _net(config), _batches()[0]
    cap = fl.capture(model, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    query = torch.tanh(model.embed(x))
    key = torch.tanh(model.memory(x[:, :S]))
    value = torch.sin(key)
    ones = torch.ones(x.shape[0], 1, 1, dtype=torch.float64)
    tokens = torch.cat([query, key, value], dim=1)
    assert torch.equal(cap["attn"].A, torch.cat([tokens, ones.expand(-1, L + 2 * S, 1)], -1))
    _, weights = model.attend(x)  # [N, HEADS, L, S]
    w_v, b_v = model.attn.in_proj_weight[2 * E :], model.attn.in_proj_bias[2 * E :]
    v = (value @ w_v.T + b_v).view(x.shape[0], S, HEADS, E // HEADS)
    heads = torch.einsum("nhls,nshd->nlhd", weights, v).reshape(x.shape[0], L, E)
    A_out = cap["attn.out_proj"].A
    assert rel_err(A_out, torch.cat([heads, ones.expand(-1, L, 1)], -1)) <= EXACT
    # G of the input projection is zero outside each token's third (q, k, v)
    G = cap["attn"].G[0]
    assert G[:, :L, E:].abs().max() == 0 and G[:, L : L + S, :E].abs().max() == 0
    assert G[:, L + S :, : 2 * E].abs().max() == 0 and G[:, :L, :E].abs().max() > 0


def test_every_method_builds_the_attention_blocks_and_woodbury_and_diag_are_exact():
    model, loss_fn, batches = _net(Config("kv", attend="kv")), nn.CrossEntropyLoss(), _batches()
    problem = fl.Problem(model, loss_fn, batches, fisher_type="empirical")
    exact = fl.exact_blocks(problem)
    blocks = fl.curvatures(problem, ["kfac", "ekfac", "woodbury", "skfac", "diag"])
    reduce = fl.curvature("kfac", problem, kfac_approx="reduce")
    for name in ("attn", "attn.out_proj"):
        F_ = exact[name]
        assert rel_err(blocks["woodbury"][name].to_dense(), F_) <= EXACT
        assert rel_err(blocks["diag"][name].to_dense(), torch.diag(torch.diag(F_))) <= EXACT
        err = {m: torch.linalg.norm(blocks[m][name].to_dense() - F_) for m in ("kfac", "ekfac")}
        assert err["ekfac"] <= err["kfac"] * (1 + 1e-10)
        # SKFAC reduces the positions (reduce-sum): KFAC-reduce's factors
        assert rel_err(blocks["skfac"][name].to_dense(), reduce[name].to_dense()) <= EXACT


def test_kfac_of_one_sample_one_token_is_exact():
    """One token, one sample, empirical Fisher: each projection's gradient is rank one."""
    model = _net(Config("self"))
    x, y = _batches()[0][0][:1, :1], torch.tensor([1])

    class OneToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            out, _ = self.net.attn(*(torch.tanh(self.net.embed(x)),) * 3, need_weights=False)
            return self.net.head(out.mean(1))

    one = OneToken()
    kfac = fl.curvature("kfac", one, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    exact = fl.exact_blocks(one, nn.CrossEntropyLoss(), x, y, fisher_type="empirical")
    for name in ("net.attn", "net.attn.out_proj"):
        assert rel_err(kfac[name].to_dense(), exact[name]) <= EXACT, name


# ---------------------------------------------------------------- against curvlinops
class LinearAttention(nn.Module):
    """The self-attention network with ``nn.Linear`` projections (what curvlinops reads)."""

    def __init__(self, net: AttentionNet):
        super().__init__()
        self.embed, self.head = net.embed, net.head
        self.in_proj = nn.Linear(E, 3 * E, dtype=torch.float64)
        self.out_proj = nn.Linear(E, E, dtype=torch.float64)
        with torch.no_grad():
            self.in_proj.weight.copy_(net.attn.in_proj_weight)
            self.in_proj.bias.copy_(net.attn.in_proj_bias)
            self.out_proj.weight.copy_(net.attn.out_proj.weight)
            self.out_proj.bias.copy_(net.attn.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        q, k, v = self.in_proj(torch.tanh(self.embed(x))).chunk(3, dim=-1)
        q, k, v = (t.view(n, L, HEADS, E // HEADS).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, L, E)
        return self.head(self.out_proj(o).mean(dim=1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
def test_kfac_equals_curvlinops_on_the_network_with_linear_projections(fisher_type, approx):
    curvlinops = pytest.importorskip("curvlinops")
    net, loss_fn, batches = _net(Config("self")), nn.CrossEntropyLoss(), _batches()
    peer_model = LinearAttention(net)
    x = batches[0][0]
    assert rel_err(peer_model(x), net(x)) <= EXACT
    problem = fl.Problem(net, loss_fn, batches, fisher_type=fisher_type)
    ours = fl.curvature("kfac", problem, kfac_approx=approx)
    for name, peer_name in (("attn", "in_proj"), ("attn.out_proj", "out_proj")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = curvlinops.KFACLinearOperator(
                peer_model,
                loss_fn,
                list(peer_model.get_submodule(peer_name).parameters()),
                batches,
                fisher_type={"true": "type-2", "empirical": "empirical"}[fisher_type],
                kfac_approx=approx,
                separate_weight_and_bias=False,
                check_deterministic=False,
            )
        block = ours[name]
        dense = peer @ torch.eye(block.size, dtype=torch.float64)
        assert rel_err(block.to_dense(), dense) <= EXACT, name


def test_exact_blocks_equal_curvlinops_ggn_of_the_attention_network():
    """(need_weights: PyTorch has no forward-mode derivative of CPU flash attention.)"""
    curvlinops = pytest.importorskip("curvlinops")
    config = Config("kv", attend="kv", need_weights=True)
    net, loss_fn, batches = _net(config), nn.CrossEntropyLoss(), _batches()
    full = fl.exact_fisher(fl.Problem(net, loss_fn, batches))
    params = [p for p in net.parameters()]
    peer = curvlinops.GGNLinearOperator(net, loss_fn, params, batches, check_deterministic=False)
    eye = torch.eye(full.matrix.shape[0], dtype=torch.float64)
    assert rel_err(full.matrix, peer @ eye) <= EXACT


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(add_bias_kv=True), "add_bias_kv"),
        (dict(add_zero_attn=True), "add_zero_attn"),
        (dict(kdim=3), "kdim=3"),
    ],
    ids=["add_bias_kv", "add_zero_attn", "kdim"],
)
def test_unsupported_configurations_are_refused_by_name(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 4))
    model.add_module("attn", nn.MultiheadAttention(4, 2, **kwargs))
    with pytest.raises(fl.UnsupportedLayerError, match=rf"'attn'.*{match}"):
        find_layers(model)
    with pytest.warns(UserWarning, match=r"'attn.out_proj'.*its parent 'attn'"):
        layers = find_layers(model, skip_unsupported=True)
    assert list(layers) == ["0"]


def test_a_subclass_overriding_forward_is_refused_with_its_out_proj():
    class Custom(nn.MultiheadAttention):
        def forward(self, x):
            return super().forward(x, x, x)

    model = nn.Sequential(nn.Linear(3, 4), Custom(4, 2))
    with pytest.warns(UserWarning, match=r"'1'.*not supported.*'1.out_proj'.*parent '1'"):
        assert list(find_layers(model, skip_unsupported=True)) == ["0"]


def test_dropout_in_training_mode_is_refused_and_skipped_by_optimizers():
    model = AttentionNet(Config("self")).double()
    model.attn.dropout = 0.1
    x, y = _batches()[0]
    with pytest.raises(fl.FisherlabError, match=r"'attn'.*training mode with dropout=0.1"):
        fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    with pytest.warns(UserWarning, match=r"'attn'.*dropout"):
        layers = find_layers(model, for_optimizer=True)
    assert "attn" not in layers and "attn.out_proj" not in layers
    model.attn.dropout = 0.0  # training mode without dropout: the same function
    blocks = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    assert set(blocks) >= {"attn", "attn.out_proj"}


def test_dropout_switched_on_after_discovery_is_refused_when_recorded():
    model = _net(Config("self"))
    x = _batches()[0][0]
    with Recorder(model, find_layers(model)):
        model.train()
        model.attn.dropout = 0.5
        with pytest.raises(fl.FisherlabError, match=r"training mode with dropout=0\.5"):
            model(x)


def test_unbatched_attention_inputs_are_refused():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # the samples are the sequence: no batch dimension
            return self.head(self.attn(x, x, x)[0])

    model = Unbatched().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(fl.FisherlabError, match="unbatched query of shape"):
        fl.capture(model, nn.CrossEntropyLoss(), x, y)


def test_backpack_backend_is_refused_naming_the_attention():
    with pytest.raises(fl.FisherlabError, match=r"'attn' \(MultiheadAttention\) is not supported"):
        fl.exact_blocks(
            PooledAttention().double(),
            nn.CrossEntropyLoss(),
            torch.randn(2, 3, 4, dtype=torch.float64),
            torch.tensor([0, 2]),
            backend="backpack",
        )


# ------------------------------------------------- the transformer encoder example (README)
class TinyTransformer(nn.Module):
    """Token and position Embeddings → an encoder block (attention, LayerNorm, feed-forward
    Linear layers, LayerNorm) → mean over positions → Linear classifier."""

    def __init__(self, vocab: int = 7, length: int = 4, d: int = 8, heads: int = 2):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.embed(tokens) + self.pos(positions)
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.ff2(torch.relu(self.ff1(h))))
        return self.head(h.mean(dim=1))


class WithEncoderLayer(nn.Module):
    """PyTorch's own ``nn.TransformerEncoderLayer`` (dropout 0) between an Embedding and a head."""

    def __init__(self, vocab: int = 7, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


TRANSFORMERS = {"tiny-transformer": TinyTransformer, "encoder-layer": WithEncoderLayer}


def _token_batches(seed: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (7, 4), generator=g)
    y = torch.randint(0, CLASSES, (7,), generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def _transformer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return TRANSFORMERS[kind]().double().eval()


@pytest.mark.parametrize("fisher_type", ["true", "empirical"])
@pytest.mark.parametrize("kind", list(TRANSFORMERS))
def test_transformer_exact_blocks_of_every_parameter_equal_brute_force(kind, fisher_type):
    model, loss_fn, batches = _transformer(kind), nn.CrossEntropyLoss(), _token_batches()
    x, y = _all(batches)
    problem = fl.Problem(model, loss_fn, batches, fisher_type=fisher_type)
    covered = {id(p) for layer in problem.layers.values() for p in layer.parameters()}
    assert covered == {id(p) for p in model.parameters()}  # no parameter skipped
    exact = fl.exact_blocks(problem)
    recorded = fl.curvature("exact", problem)
    names = list(problem.layers)
    if fisher_type == "true":  # one dense GGN of all parameters, cut into the blocks
        full = brute_force_ggn(model, loss_fn, x, y, names)
    start = 0
    for name in names:
        size = problem.layers[name].num_params
        if fisher_type == "true":
            reference = full[start : start + size, start : start + size]
            start += size
        else:
            grads = per_sample_grads(model, loss_fn, x, y, name)
            reference = grads.T @ grads / x.shape[0]
        assert rel_err(exact[name], reference) <= EXACT, name
        assert rel_err(recorded[name].to_dense(), reference) <= EXACT, name


def test_transformer_compare_reports_every_layer_and_method():
    model, loss_fn, batches = (
        _transformer("tiny-transformer"),
        nn.CrossEntropyLoss(),
        _token_batches(),
    )
    problem = fl.Problem(model, loss_fn, batches)
    rows = fl.compare(problem, progress=False)
    methods = {r["method"] for r in rows}
    assert {(r["layer"], r["method"]) for r in rows} == {
        (name, m) for name in problem.layers for m in methods
    }
    assert all(r["rel_frobenius"] == r["rel_frobenius"] for r in rows)  # no NaN: none refused
    woodbury = [r for r in rows if r["method"] == "woodbury"]
    assert max(r["rel_frobenius"] for r in woodbury) <= 1e-10  # Woodbury is the exact block


def test_transformer_passes_verify():
    model, loss_fn, batches = (
        _transformer("tiny-transformer"),
        nn.CrossEntropyLoss(),
        _token_batches(),
    )
    x, y = batches[0]
    report = fl.verify(model, loss_fn, x[:3], y[:3], fisher_types=["true"], progress=False)
    assert report.ok, report.violations
    assert {c.layer for c in report.checks} == set(find_layers(model))


def test_the_built_in_transformer_has_every_parameter_as_a_layer_and_passes_verify():
    """``--model transformer``: image rows as tokens (what ``fisherlab compare`` runs)."""
    torch.manual_seed(0)
    model = fl.models.create("transformer", (1, 8, 8), 10).double()
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3, 9])
    layers = find_layers(model)
    assert {id(p) for layer in layers.values() for p in layer.parameters()} == {
        id(p) for p in model.parameters()
    }
    exact = fl.exact_blocks(model, nn.CrossEntropyLoss(), x, y)
    recorded = fl.curvature("exact", model, nn.CrossEntropyLoss(), x, y)
    for name in layers:
        assert rel_err(recorded[name].to_dense(), exact[name]) <= EXACT, name
    assert fl.verify(model, nn.CrossEntropyLoss(), x, y, fisher_types=["true"], progress=False).ok
