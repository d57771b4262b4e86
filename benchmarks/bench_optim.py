"""Optimizer steps in alternation: ÷ SGD, ÷ FLOP floor, ÷ plain reference, ÷ ASDL like for like.

One command regenerates the results and the README's table (between the markers
``<!-- bench_optim:start -->`` and ``<!-- bench_optim:end -->``)::

    python benchmarks/bench_optim.py             # MLP, 3C1F, tiny MLP; one thread
    python benchmarks/bench_optim.py --quick     # smoke test on tiny sizes, seconds

**Protocol.** A step is ``zero_grad; forward; loss; backward; step`` on one synthetic batch
(cross-entropy, batch 128). Every contender has its own copy of the model (same initialisation)
and optimizer in this one process. After ``--warmup`` steps each (a multiple of the
decomposition interval; FNGD's first epoch is over), ``--rounds`` rounds time a block of
``--block`` steps of every contender in turn (the order rotated, and reversed every other
round, so that a slow spell of the shared machine does not fall on the same contenders). A
ratio is taken within a round (two blocks timed minutes apart are not compared); the table
gives the median over rounds and the range. ``SGD (control)`` is a second SGD: its ratio to
SGD shows the noise of the run.

**Contenders.** ``torch.optim.SGD`` (momentum 0.9); fisherlab's KFAC (eigen and factored
damping), EKFAC, TENGraD, FNGD, SKFAC, and KFAC/EKFAC with statistics every 10 steps
(``stat_every=10``); for each, the plain-PyTorch step with the same arithmetic
(``reference_steps.py``, checked by ``tests/test_reference_steps.py`` to give the same
parameter change to 1e-10 in float64), and TENGraD's paper route (Gram + ``Jᵀw``, plain only);
ASDL (``asdfghjkl`` 0.1a5, the ``bench`` extra), when installed. All: lr 1e-3, damping 1e-2,
momentum 0.9, running-average decay 0.95, eigen-decompositions or inverses every 10 steps,
empirical Fisher, FNGD's epoch 10 steps.

**Like for like with ASDL.** ASDL's ``KfacGradientMaker`` with ``fisher_type="fisher_emp"``,
``curvature_upd_interval=1`` (curvature every step: its default follows the preconditioner
interval), ``preconditioner_upd_interval=10``, ``ema_decay=0.05`` (its running average,
``curv ← 0.95·curv + 0.05·new``) and ``damping=1e-2`` (factored Tikhonov damping with ``π``,
ASDL's only mode: compared with fisherlab's ``damping_mode="factored"``); ASDL computes its
inverses in float32, fisherlab in float64. ASDL's ``SmwEmpNaturalGradientMaker`` (the
Sherman–Morrison–Woodbury empirical natural gradient of the whole network, Gram + ``Jᵀw``, one
Cholesky per step) against TENGraD (per-layer blocks). Each ASDL step is its
``forward_and_backward`` plus the same SGD step. On a CPU-only torch, ASDL's ``update_inv``
crashes in ``torch.cuda.nvtx.range`` ("NVTX functions not installed"):
:func:`patch_asdl_nvtx` replaces the ``nvtx`` of ASDL's modules by a no-op (timing only).

**FLOPs.** ``torch.utils.flop_counter.FlopCounterMode`` counts the products of one interval of
steps (amortised per step) of SGD, of each fisherlab step and of each plain step. The counter
does not see LAPACK: the floor of a method is its plain step's counted FLOPs plus its
decompositions at textbook costs (``eigh`` 9n³, Cholesky n³/3, inverse from it 2n³/3,
Cholesky solve 2n²k; ``reference_steps.py``). ``÷ floor`` is the measured ratio to SGD
divided by the floor's ratio to SGD's counted FLOPs: 1 means the step runs at SGD's FLOP rate.

**Profile.** For each fisherlab step more than 1.10× its plain step, one block of each is run
under ``torch.profiler``; the ATen operators with the largest difference in self CPU time per
step, and the time outside operators (Python), name where the gap is.

``host_syncs`` counts, in one step, the calls that make the host wait for the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from reference_steps import REFERENCES  # benchmarks/, beside this script
from syncs import counting_syncs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fisherlab as fl
from fisherlab.files import write_text
from fisherlab.report import format_table, save_table

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- bench_optim:start -->", "<!-- bench_optim:end -->"
LR, DAMPING, MOMENTUM, DECAY, INTERVAL = 1e-3, 1e-2, 0.9, 0.95, 10
#: The aims of issue 21.
AIM_PLAIN, AIM_FLOOR, AIM_ASDL, AIM_FIXED_MS = 1.10, 1.15, 1.0, 0.4

#: fisherlab method → label.
METHODS = {
    "kfac": "KFAC, eigen damping",
    "kfac-factored": "KFAC, factored damping",
    "ekfac": "EKFAC",
    "tengrad": "TENGraD",
    "fngd": "FNGD (after its first epoch)",
    "skfac": "SKFAC",
}
#: Methods also run with statistics every 10 steps.
STAT_EVERY_10 = ("kfac", "kfac-factored", "ekfac")
#: fisherlab contender → ASDL's same method.
ASDL_PEER = {
    "kfac-factored": "asdl-kfac", "tengrad": "asdl-smw",
    "plain:kfac-factored": "asdl-kfac", "plain:tengrad-paper": "asdl-smw",
}  # fmt: skip


# ---------------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


def three_conv_one_fc() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )  # fmt: skip


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )  # fmt: skip


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1×1 projection where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet() -> nn.Module:
    """A ResNet-style net (BatchNorm: its parameters take the plain step in every contender)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Residual(16, 16, 1), _Residual(16, 32, 2), _Residual(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


#: name → (builder, input shape, batch, label).
MODELS = {
    "mlp": (mlp, (1, 28, 28), 128, "MLP 784-512-256-10"),
    "3c1f": (three_conv_one_fc, (1, 28, 28), 128, "3C1F"),
    "tiny": (tiny_mlp, (32,), 32, "tiny MLP 32-32-10"),
    "tinycnn": (tiny_cnn, (1, 8, 8), 16, "tiny CNN"),
    "resnet": (resnet, (3, 32, 32), 128, "ResNet-style, BatchNorm"),
}
ALIASES = {"cnn": "3c1f"}


# ------------------------------------------------------------------------------ contenders
def fisherlab_optimizer(method: str, model: nn.Module, stat_every: int = 1):
    common = dict(lr=LR, damping=DAMPING, momentum=MOMENTUM, unsupported="sgd")
    kfac = dict(stat_decay=DECAY, stat_every=stat_every)
    if method in ("kfac", "kfac-factored"):
        mode = "factored" if method == "kfac-factored" else "eigen"
        return fl.optim.KFAC(model, inv_update_freq=INTERVAL, damping_mode=mode, **kfac, **common)
    if method == "ekfac":
        return fl.optim.EKFAC(model, basis_update_freq=INTERVAL, **kfac, **common)
    if method == "tengrad":
        return fl.optim.TENGraD(model, **common)
    if method == "fngd":
        return fl.optim.FNGD(model, steps_per_epoch=INTERVAL, **common)
    if method == "skfac":
        return fl.optim.SKFAC(model, stat_decay=DECAY, **common)
    raise ValueError(method)


def reference_optimizer(method: str, model: nn.Module, stat_every: int = 1):
    common = dict(lr=LR, damping=DAMPING, momentum=MOMENTUM)
    if method in ("kfac", "kfac-factored", "ekfac"):
        common.update(stat_decay=DECAY, stat_every=stat_every, inv_every=INTERVAL)
    elif method == "fngd":
        common.update(steps_per_epoch=INTERVAL)
    elif method == "skfac":
        common.update(stat_decay=DECAY)
    return REFERENCES[method](model, **common)


def patch_asdl_nvtx() -> None:
    """No-op ``nvtx`` in ASDL's modules: ``torch.cuda.nvtx.range`` raises without CUDA."""
    import asdl.operations.operation
    import asdl.precondition.natural_gradient
    import asdl.utils

    shim = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
    for module in (asdl.precondition.natural_gradient, asdl.operations.operation, asdl.utils):
        module.nvtx = shim


def asdl_makers(batch: int) -> dict[str, Callable[[nn.Module], Any]]:
    """ASDL's KFAC (like for like) and SMW natural gradient, or nothing if not installed."""
    try:
        from asdl import FISHER_EMP, KfacGradientMaker, PreconditioningConfig
        from asdl.precondition.smw import SmwEmpNaturalGradientConfig, SmwEmpNaturalGradientMaker
    except Exception:  # not installed, or does not import beside this torch
        return {}
    if not torch.cuda.is_available():
        patch_asdl_nvtx()
    config = dict(
        data_size=batch, damping=DAMPING, curvature_upd_interval=1,
        preconditioner_upd_interval=INTERVAL, ema_decay=1 - DECAY,
    )  # fmt: skip
    return {
        "asdl-kfac": lambda m: KfacGradientMaker(
            m, PreconditioningConfig(**config), fisher_type=FISHER_EMP
        ),
        "asdl-smw": lambda m: SmwEmpNaturalGradientMaker(
            m, SmwEmpNaturalGradientConfig(data_size=batch, damping=DAMPING)
        ),
    }


@dataclass
class Contender:
    """One optimizer on its own copy of the model: ``step()`` is one training step."""

    name: str
    kind: str  # "sgd", "fisherlab", "plain", "asdl"
    method: str
    stat_every: int
    step: Callable[[], None]
    optimizer: Any
    times: list[float] = field(default_factory=list)
    host_syncs: int = 0

    @property
    def decomposition_flops(self) -> float:
        return getattr(self.optimizer, "decomposition_flops", 0.0)


def contenders(model_name: str, batch: int, device: str) -> list[Contender]:
    build, shape, _, _ = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def model_copy() -> nn.Module:
        torch.manual_seed(0)
        return build().to(device)

    def torch_like(name, kind, method, stat_every, make) -> Contender:
        model = model_copy()
        opt = make(model)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        return Contender(name, kind, method, stat_every, step, opt)

    out = [
        torch_like(
            n, "sgd", "sgd", 1, lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM)
        )
        for n in ("sgd", "sgd-control")
    ]
    runs = [(m, 1) for m in METHODS] + [(m, 10) for m in STAT_EVERY_10]
    for method, every in runs:
        suffix = "" if every == 1 else f"@{every}"
        out.append(
            torch_like(method + suffix, "fisherlab", method, every,
                       lambda m, method=method, every=every: fisherlab_optimizer(method, m, every))
        )  # fmt: skip
        out.append(
            torch_like("plain:" + method + suffix, "plain", method, every,
                       lambda m, method=method, every=every: reference_optimizer(method, m, every))
        )  # fmt: skip
    out.append(
        torch_like("plain:tengrad-paper", "plain", "tengrad-paper", 1,
                   lambda m: reference_optimizer("tengrad-paper", m))
    )  # fmt: skip
    for name, make in asdl_makers(batch).items():
        model = model_copy()
        maker = make(model)
        sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

        def step(model=model, maker=maker, sgd=sgd):
            sgd.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(loss_fn, dummy, y)
            maker.forward_and_backward()
            sgd.step()

        try:  # ASDL may not take the model (a layer type it does not know)
            with quiet():
                step()
        except Exception as err:
            print(f"{name} skipped: {type(err).__name__}: {err}")
            continue
        out.append(Contender(name, "asdl", name, 1, step, maker))
    return out


# -------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def block_time(c: Contender, steps: int, device: str) -> float:
    """Seconds per step over one block of ``steps`` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        c.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def count_flops(c: Contender) -> tuple[float, float]:
    """Counted FLOPs per step over one interval, and with the decompositions added."""
    before = c.decomposition_flops
    with FlopCounterMode(display=False) as counter:
        for _ in range(INTERVAL):
            c.step()
    counted = counter.get_total_flops() / INTERVAL
    return counted, counted + (c.decomposition_flops - before) / INTERVAL


def profile_ops(c: Contender, steps: int) -> tuple[dict[str, float], float, float]:
    """Self CPU ms per step of each ATen operator over one block, the wall ms per step and
    the operator calls per step."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            c.step()
    wall = (time.perf_counter() - start) / steps * 1e3
    ops, calls = {}, 0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total / 1e3 / steps
            calls += event.count
    return ops, wall, calls / steps


def cpu_share(start_wall: float, start_cpu: float, threads: int) -> float:
    """CPU time this process got per wall second and thread since the start."""
    wall = time.perf_counter() - start_wall
    return (time.process_time() - start_cpu) / (wall * threads)


def bench_model(
    model_name: str, batch: int, args: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    label = MODELS[model_name][3]
    with quiet():
        cs = contenders(model_name, batch, args.device)
        for c in cs:
            with counting_syncs() as syncs:
                c.step()
            c.host_syncs = syncs[0]
            for _ in range(args.warmup - 1):
                c.step()
        flops = {c.name: count_flops(c) for c in cs if c.kind != "asdl"}
        order = list(cs)
        for r in range(args.rounds):
            shift = r % len(order)
            sequence = order[shift:] + order[:shift]
            for c in sequence[::-1] if r % 2 else sequence:
                c.times.append(block_time(c, args.block, args.device))
    by_name = {c.name: c for c in cs}
    sgd = by_name["sgd"]
    rows = []
    for c in cs:
        ratio_sgd = [t / s for t, s in zip(c.times, sgd.times)]
        row = {
            "model": model_name,
            "label": label,
            "batch": batch,
            "contender": c.name,
            "kind": c.kind,
            "method": c.method,
            "stat_every": c.stat_every,
            "step_ms": 1e3 * statistics.median(c.times),
            "extra_ms": 1e3 * statistics.median(t - s for t, s in zip(c.times, sgd.times)),
            **_spread("ratio_sgd", ratio_sgd),
            "host_syncs": c.host_syncs,
        }
        counted = flops.get(c.name)
        row["gflop_counted"] = counted[0] / 1e9 if counted else None
        plain = by_name.get("plain:" + c.name) if c.kind == "fisherlab" else None
        if c.kind == "plain":
            plain = c
        if plain is not None and c.kind != "asdl":
            floor = flops[plain.name][1] / flops["sgd"][0]
            row["floor_gflop"] = flops[plain.name][1] / 1e9
            row["floor_ratio"] = floor
            row["over_floor"] = row["ratio_sgd"] / floor
        else:
            row.update(floor_gflop=None, floor_ratio=None, over_floor=None)
        if c.kind == "fisherlab":
            row.update(_spread("ratio_plain", [t / p for t, p in zip(c.times, plain.times)]))
        else:
            row.update(ratio_plain=None, ratio_plain_min=None, ratio_plain_max=None)
        peer = by_name.get(ASDL_PEER.get(c.name, ""))
        if peer is not None:
            row.update(_spread("ratio_asdl", [t / p for t, p in zip(c.times, peer.times)]))
        else:
            row.update(ratio_asdl=None, ratio_asdl_min=None, ratio_asdl_max=None)
        row["round_ratios_sgd"] = " ".join(f"{r:.3g}" for r in ratio_sgd)
        row["round_ms"] = " ".join(f"{1e3 * t:.4g}" for t in c.times)
        rows.append(row)
    profiles = []
    if args.profile and (args.quick or model_name not in ("tiny", "tinycnn")):
        with quiet():
            for row in rows:
                if len(profiles) >= args.profile_limit:
                    break
                if row["kind"] == "fisherlab" and row["ratio_plain"] > AIM_PLAIN:
                    profiles.append(
                        _profile_gap(
                            by_name[row["contender"]],
                            by_name["plain:" + row["contender"]],
                            model_name,
                            args.block,
                        )
                    )
    for c in cs:
        if hasattr(c.optimizer, "close"):
            c.optimizer.close()
    return rows, profiles


def _spread(key: str, values: list[float]) -> dict[str, float]:
    return {key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)}


def _profile_gap(ours: Contender, plain: Contender, model_name: str, steps: int) -> dict:
    """Where a fisherlab step spends more than its plain step (ms per step, by operator)."""
    ops_ours, wall_ours, calls_ours = profile_ops(ours, steps)
    ops_plain, wall_plain, calls_plain = profile_ops(plain, steps)
    names = set(ops_ours) | set(ops_plain)
    gaps = {n: ops_ours.get(n, 0.0) - ops_plain.get(n, 0.0) for n in names}
    top = sorted(gaps.items(), key=lambda kv: -kv[1])[:6]
    outside_ours = wall_ours - sum(ops_ours.values())
    outside_plain = wall_plain - sum(ops_plain.values())
    return {
        "model": model_name,
        "contender": ours.name,
        "wall_ms": wall_ours,
        "plain_wall_ms": wall_plain,
        "aten_calls": calls_ours,
        "plain_aten_calls": calls_plain,
        "outside_ops_ms": outside_ours,
        "plain_outside_ops_ms": outside_plain,
        "top_ops_ms": {name: round(gap, 3) for name, gap in top},
    }


# ------------------------------------------------------------------------------ the README
def _cell(row: dict, key: str, digits: int = 2) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    low, high = row.get(f"{key}_min"), row.get(f"{key}_max")
    text = f"{value:.{digits}f}"
    return text + (f" ({low:.{digits}f}–{high:.{digits}f})" if low is not None else "")


def markdown(rows: list[dict], profiles: list[dict], machine: dict) -> str:
    """The README section: one table per model, the aims, the profiled gaps."""
    out = [
        f"Generated by `python benchmarks/bench_optim.py` ({machine['when']}): "
        f"{machine['processor']}, {machine['threads']} thread, torch {machine['torch']}, "
        f"{machine['device']}; {machine['note']} Load average before/after: "
        f"{machine['load_before']} / {machine['load_after']}; CPU share of this process "
        f"{machine['cpu_share']:.2f} (1 = an idle core). Rounds: {machine['rounds']} × "
        f"blocks of {machine['block']} steps, median (range over rounds). ASDL: "
        f"{machine['asdl'] or 'not installed'}.",
        "",
    ]
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        part = [r for r in rows if r["model"] == model and r["batch"] == batch]
        sgd = next(r for r in part if r["contender"] == "sgd")
        plain = {r["contender"][len("plain:") :]: r for r in part if r["kind"] == "plain"}
        out += [
            f"**{part[0]['label']}, batch {part[0]['batch']}** (SGD {sgd['step_ms']:.2f} ms "
            f"per step, {sgd['gflop_counted']:.3g} GFLOP counted):",
            "",
            "| optimizer | ms | ÷ SGD | plain ÷ SGD | floor ÷ SGD | ÷ floor | ÷ plain | ÷ ASDL "
            "| products ÷ plain's |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in part:
            if r["kind"] == "plain" and r["method"] != "tengrad-paper":
                continue
            label = _label(r)
            p = plain.get(r["contender"])
            out.append(
                f"| {label} | {r['step_ms']:.2f} | {_cell(r, 'ratio_sgd')} | "
                f"{_cell(p, 'ratio_sgd') if p else '—'} | "
                f"{'—' if r['floor_ratio'] is None else format(r['floor_ratio'], '.2f')} | "
                f"{'—' if r['over_floor'] is None else format(r['over_floor'], '.2f')} | "
                f"{_cell(r, 'ratio_plain')} | {_cell(r, 'ratio_asdl')} | {_products(r, p)} |"
            )
        out.append("")
    out += _aims(rows)
    if profiles:
        out += [
            "",
            "Where fisherlab's step spends more than its plain step (profiled block, "
            "ms per step: fisherlab's self CPU time minus the plain step's, by operator; "
            "'outside operators' is Python and hooks):",
            "",
        ]
        for p in profiles:
            ops = ", ".join(f"`{k}` {v:+.2f}" for k, v in p["top_ops_ms"].items())
            out.append(
                f"- {p['model']} {p['contender']}: {p['wall_ms']:.1f} vs {p['plain_wall_ms']:.1f} "
                f"ms; {p['aten_calls']:.0f} vs {p['plain_aten_calls']:.0f} operator calls; "
                f"outside operators {p['outside_ops_ms']:.1f} vs "
                f"{p['plain_outside_ops_ms']:.1f} ms; {ops}"
            )
    return "\n".join(out).rstrip() + "\n"


def _products(row: dict, plain: dict | None) -> str:
    """fisherlab's counted products (FLOPs) over its plain step's."""
    if row["kind"] != "fisherlab" or plain is None or not plain["gflop_counted"]:
        return "—"
    return f"{row['gflop_counted'] / plain['gflop_counted']:.2f}"


def _label(row: dict) -> str:
    if row["kind"] == "sgd":
        return "SGD" if row["contender"] == "sgd" else "SGD (control)"
    if row["kind"] == "asdl":
        return {"asdl-kfac": "ASDL KFAC (like for like)", "asdl-smw": "ASDL SMW"}[row["method"]]
    if row["method"] == "tengrad-paper":
        return "TENGraD, paper's route (plain only)"
    label = METHODS[row["method"]]
    return label + (f", `stat_every={row['stat_every']}`" if row["stat_every"] != 1 else "")


def _aims(rows: list[dict]) -> list[str]:
    """Which aims are met, from the table (models other than the tiny ones)."""
    big = [r for r in rows if r["kind"] == "fisherlab" and r["model"] in ("mlp", "3c1f")]
    tiny = [r for r in rows if r["kind"] == "fisherlab" and r["model"] == "tiny"]
    lines = []

    def verdict(name: str, bound: float, key: str, chosen: list[dict]) -> None:
        if not chosen:
            return
        missed = [f"{r['model']} {r['contender']} {r[key]:.2f}" for r in chosen if r[key] > bound]
        lines.append(
            f"- {name} ≤ {bound}: "
            + ("met by all." if not missed else f"met by {len(chosen) - len(missed)} of "
               f"{len(chosen)}; not by " + ", ".join(missed) + ".")
        )  # fmt: skip

    verdict("÷ plain", AIM_PLAIN, "ratio_plain", big)
    verdict("÷ floor", AIM_FLOOR, "over_floor", big)
    verdict("÷ ASDL", AIM_ASDL, "ratio_asdl", [r for r in big if r["ratio_asdl"] is not None])
    if tiny:
        plain = {r["contender"]: r for r in rows if r["model"] == "tiny" and r["kind"] == "plain"}
        fixed = ", ".join(
            f"{r['contender']} {r['extra_ms']:.2f} "
            f"(plain {plain['plain:' + r['contender']]['extra_ms']:.2f})"
            for r in tiny
        )
        lines.append(
            f"- Fixed cost on the tiny MLP (ms per step above SGD's; aim ≤ {AIM_FIXED_MS}): "
            + fixed
            + "."
        )
    return ["Aims (issue 21; on MLP and 3C1F):", "", *lines] if lines else []


def update_readme(path: Path, section: str) -> bool:
    """Replace the text between the markers; ``False`` if the markers are not there."""
    text = path.read_text()
    if START not in text or END not in text:
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(path, f"{head}{START}\n{section}{END}{tail}")
    return True


# ---------------------------------------------------------------------------------- main
SUMMARY_KEYS = (
    "model", "contender", "step_ms", "ratio_sgd", "floor_ratio", "over_floor", "ratio_plain",
    "ratio_asdl",
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["mlp", "3c1f", "tiny"], choices=[*MODELS, *ALIASES]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="default: each model's own"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=INTERVAL, help="steps before timing")
    parser.add_argument("--block", type=int, default=INTERVAL, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks of each contender")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument(
        "--profile-limit", type=int, default=None, help="profiled contenders per model at most"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: tiny models, 2 rounds, results *_quick, README untouched",
    )  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", default=None, help="results name (default bench_optim_DEVICE)")
    parser.add_argument(
        "--readme", type=lambda text: Path(text) if text else None, default=README,
        help="README whose section to replace ('' for none; never with --quick or on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--note", default="a shared 2-core VM, loaded by other jobs during the run.",
        help="what to say about the machine",
    )  # fmt: skip
    parser.add_argument(
        "--render", type=Path, default=None,
        help="only re-render the markdown and the README section from a results JSON",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.block, args.warmup = ["tiny", "tinycnn"], 2, 2, 2
        args.profile_limit = 1
    elif args.profile_limit is None:
        args.profile_limit = len(METHODS) + len(STAT_EVERY_10)
    if args.quick or args.device != "cpu":
        args.readme = None
    default = f"bench_optim_{'cuda' if args.device == 'cuda' else 'cpu'}"
    args.out = args.out or default + ("_quick" if args.quick else "")
    return args


def write_results(rows: list[dict], machine: dict, args: argparse.Namespace) -> list[Path]:
    """CSV, JSON and the markdown section; the README's section when ``args.readme``."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = save_table(rows, args.out_dir / args.out, machine)
    section = markdown(rows, machine["profiles"], machine)
    paths.append(write_text(args.out_dir / f"{args.out}.md", section))
    if args.readme is not None:
        if update_readme(args.readme, section):
            paths.append(args.readme)
        else:
            print(f"{args.readme} has no {START} … {END} markers: not updated")
    return paths


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        section = markdown(saved["rows"], saved["meta"].get("profiles", []), saved["meta"])
        write_text(args.render.with_suffix(".md"), section)
        print(section)
        if args.readme is not None and not update_readme(args.readme, section):
            print(f"{args.readme} has no {START} … {END} markers: not updated")
        return
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    rows, profiles = [], []
    models = [ALIASES.get(m, m) for m in args.models]
    runs = [(m, b) for m in models for b in args.batch_sizes or [MODELS[m][2]]]
    for index, (model, batch) in enumerate(runs):
        model_rows, model_profiles = bench_model(model, batch, args)
        rows += model_rows
        profiles += model_profiles
        print(format_table([{k: r[k] for k in SUMMARY_KEYS} for r in model_rows]))
        machine = _machine(args, load_before, start_wall, start_cpu, profiles)
        if index < len(runs) - 1:  # kept if a later model fails or the run is stopped
            save_table(rows, args.out_dir / args.out, {**machine, "partial": True})
    paths = write_results(rows, machine, args)
    print(markdown(rows, profiles, machine))
    print(json.dumps({"saved": [str(p) for p in paths]}))


def _machine(
    args: argparse.Namespace, load_before: str, start_wall: float, start_cpu: float,
    profiles: list[dict],
) -> dict:  # fmt: skip
    """The run's machine, settings and profiles (the JSON's ``meta``)."""
    try:
        from importlib.metadata import version

        asdl = f"asdfghjkl {version('asdfghjkl')}" if asdl_makers(8) else None
    except Exception:
        asdl = None
    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "processor": _processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "CPU",
        "note": args.note,
        "load_before": load_before,
        "load_after": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "cpu_share": cpu_share(start_wall, start_cpu, torch.get_num_threads()),
        "rounds": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
        "asdl": asdl,
        "settings": {
            "lr": LR, "damping": DAMPING, "momentum": MOMENTUM, "stat_decay": DECAY,
            "interval": INTERVAL, "fisher_type": "empirical",
            "asdl_kfac": "KfacGradientMaker(fisher_type='fisher_emp', curvature_upd_interval=1, "
            f"preconditioner_upd_interval={INTERVAL}, ema_decay={1 - DECAY:.2f}, "
            f"damping={DAMPING})",
            "asdl_smw": f"SmwEmpNaturalGradientMaker(damping={DAMPING})",
        },
        "profiles": profiles,
    }  # fmt: skip


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
