r"""Build + solve time and memory of the curvature blocks, and the two routes to the Woodbury Gram.

What is measured (all in one process and one run, so every ratio compares like with like):

* **Linear layer** ``d_in = d_out = d`` for ``d`` in ``--widths`` (default 32 … 2048), the first
  layer of ``nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 10))`` on a batch
  ``randn(N, d)`` (``N = --batch``, 128) with ``CrossEntropyLoss``; ``P = d·(d+1)``.
* **Conv2d layer**: the first layer of ``Conv2d(c, c, 3, padding=1), ReLU, Flatten,
  Linear(c·h·w, 10)`` on ``randn(N, c, h, w)`` (default ``c = 16``, ``8×8``: ``T = 64``
  positions, ``P = 2,320``).
* One capture per problem (``fl.capture``, timed once; it is shared by every method). Then, per
  method, a fresh ``build(method, cap)`` on a capture restricted to the benchmarked layer, the
  first ``solve(g, damping)`` (which pays the lazy eigendecompositions / Gram) and a second solve
  (the amortised cost). ``g`` is the layer's mini-batch gradient. Memory is ``block.nbytes``
  after the solves. The dense ``exact`` block (``eigh`` of ``P×P``) runs only where
  ``P ≤ --exact-max-p``; elsewhere it is reported as ``n/a`` with the size of ``P²``.
* Checks (outside the timings): the relative residual ``‖(F̂+λI)x − g‖/‖g‖`` of each solve against
  the block's own ``matvec``, and ``‖x − x_exact‖/‖x_exact‖`` where the exact block exists
  (``woodbury`` with an exact Gram should agree; the others are approximations).
* **Gram routes**: ``fisherlab.blocks.woodbury.gram(A, G, route)`` from covariance factors
  (``"covariance"``) vs from explicit per-sample gradients (``"gradients"``, ``JJᵀ``); both give
  ``K``, their max relative difference is reported, and ``ratio = t_gradients / t_covariance``.
* **Break-down** at the widest Linear layer: the pieces that make up the ``kfac``/``ekfac``/
  ``woodbury`` times (factor products, ``symmetric_eigh`` — float64 for float32 input — against a
  plain float32 ``eigh``, ``kfe_scalings`` against the equivalent ``T = 1`` matmul, the
  parameter ↔ Kronecker reorder of every ``solve``, and the index tensor every block holds).
* The crossover: the smallest width where ``woodbury``'s build + first solve is faster than
  ``kfac``'s (also for the second, amortised solve).

Timing: one untimed warm-up of every case, then ``--repeats`` timed calls taken round-robin over
the methods of a problem (background load hits all alike); the median is reported. A case whose
warm-up exceeds ``--slow-case`` seconds is timed once (the ``repeats`` column says so). The load
average before and after is recorded: on a shared machine, 2 OpenMP threads fighting other
processes can slow LAPACK's ``eigh`` 5–10×, so compare runs only at similar load.

Run::

    python benchmarks/bench_blocks.py                 # full run, ~5 minutes on 2 cores
    python benchmarks/bench_blocks.py --quick         # widths 32 and 64, small conv: seconds
    python benchmarks/bench_blocks.py --fisher-type true --dtype float64
    python benchmarks/bench_blocks.py --help

Results: ``benchmarks/results/bench_blocks.{json,csv,png}`` (``bench_blocks_quick.*`` with
``--quick``; change with ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fisherlab as fl
from fisherlab.blocks import build
from fisherlab.blocks.base import CurvatureBlock
from fisherlab.blocks.ekfac import kfe_scalings
from fisherlab.blocks.factors import gradient_factor, input_factor
from fisherlab.blocks.woodbury import choose_gram_route, gram
from fisherlab.capture import Capture
from fisherlab.linalg import symmetric_eigh
from fisherlab.report import format_table

RESULTS = Path(__file__).resolve().parent / "results"
LINEAR_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("exact", {}),
    ("kfac", {}),
    ("ekfac", {}),
    ("woodbury", {}),
    ("skfac", {}),
]
CONV_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("exact", {}),
    ("kfac", {}),
    ("ekfac", {}),
    ("woodbury", {"gram_route": "covariance"}),
    ("woodbury", {"gram_route": "gradients"}),
    ("woodbury", {"conv_gram": "reduce_sum"}),
    ("skfac", {"conv_reduction": "sum"}),
    ("skfac", {"conv_reduction": "subsample", "spatial_samples": 8}),
]
#: Line colours of the plot, one per method (and Gram route).
COLOURS = {
    "exact": "#4d4d4d",
    "kfac": "#1f77b4",
    "ekfac": "#17becf",
    "woodbury": "#d62728",
    "skfac": "#2ca02c",
    "covariance": "#d62728",
    "gradients": "#9467bd",
}
MARKERS = {"exact": "s", "kfac": "o", "ekfac": "D", "woodbury": "^", "skfac": "v"}


# ------------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Problem:
    """One benchmarked layer: its capture, gradient and shapes."""

    case: str  # "linear" | "conv"
    width: int | None
    label: str
    cap: Capture  # restricted to the benchmarked layer
    full_cap: Capture
    grad: Tensor  # the layer's mini-batch gradient, parameter order
    capture_s: float
    size: int  # P
    rows: int  # M = R·N
    positions: int  # T


def make_problem(
    case: str,
    width: int | None,
    model: nn.Sequential,
    x: Tensor,
    fisher_type: str,
    seed: int,
    repeats: int,
) -> Problem:
    torch.manual_seed(seed)
    y = torch.randint(0, 10, (x.shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    full = fl.capture(model, loss_fn, x, y, fisher_type=fisher_type)  # warm-up, kept
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fl.capture(model, loss_fn, x, y, fisher_type=fisher_type)
        times.append(time.perf_counter() - start)
    capture_s = statistics.median(times)
    first = model[0]
    params = [first.weight, first.bias]
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    grad = torch.cat([g.reshape(-1) for g in grads]).detach()
    lc = full["0"]
    return Problem(
        case=case,
        width=width,
        label=f"{type(first).__name__}",
        cap=dataclasses.replace(full, layers={"0": lc}),
        full_cap=full,
        grad=grad,
        capture_s=capture_s,
        size=lc.layer.num_params,
        rows=lc.G.shape[0] * lc.G.shape[1],
        positions=lc.A.shape[1],
    )


def linear_problem(
    width: int, batch: int, dtype: torch.dtype, fisher_type: str, seed: int, repeats: int
) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)).to(dtype)
    x = torch.randn(batch, width, dtype=dtype)
    problem = make_problem("linear", width, model, x, fisher_type, seed, repeats)
    problem.label = f"Linear({width}, {width})"
    return problem


def conv_problem(
    channels: int,
    side: int,
    batch: int,
    dtype: torch.dtype,
    fisher_type: str,
    seed: int,
    repeats: int,
) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * side * side, 10),
    ).to(dtype)
    x = torch.randn(batch, channels, side, side, dtype=dtype)
    problem = make_problem("conv", None, model, x, fisher_type, seed, repeats)
    problem.label = f"Conv2d({channels}, {channels}, 3) on {side}×{side}"
    return problem


# ------------------------------------------------------------------------------- timing
def variant_name(method: str, options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def gigabytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


@dataclasses.dataclass
class BlockCase:
    """One method (with options) on one problem, and its timings."""

    method: str
    options: dict[str, Any]
    skip: str | None = None
    samples: list[dict[str, float]] = dataclasses.field(default_factory=list)
    nbytes: int | None = None
    gram_route: str | None = None
    solution: Tensor | None = None
    residual: float | None = None

    def run(self, problem: Problem, damping: float, check: bool = False) -> None:
        t0 = time.perf_counter()
        block: CurvatureBlock = build(self.method, problem.cap, **self.options)["0"]
        t1 = time.perf_counter()
        x = block.solve(problem.grad, damping=damping)
        t2 = time.perf_counter()
        block.solve(problem.grad, damping=damping)
        t3 = time.perf_counter()
        self.nbytes = block.nbytes
        self.gram_route = getattr(block, "gram_route", None)
        if check:
            self.solution = x
            lhs = block.matvec(x) + damping * x
            self.residual = float((lhs - problem.grad).norm() / problem.grad.norm())
        else:
            self.samples.append({"build": t1 - t0, "solve1": t2 - t1, "solve2": t3 - t2})

    def median(self, key: str) -> float | None:
        if not self.samples:
            return None
        if key == "build_solve":
            return statistics.median(s["build"] + s["solve1"] for s in self.samples)
        return statistics.median(s[key] for s in self.samples)


def bench_problem(
    problem: Problem,
    methods: list[tuple[str, dict[str, Any]]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    cases = [BlockCase(method, dict(options)) for method, options in methods]
    itemsize = problem.grad.element_size()
    for case in cases:
        if case.method == "exact" and problem.size > args.exact_max_p:
            case.skip = f"n/a (P² = {gigabytes(problem.size**2 * itemsize)})"
    active = [c for c in cases if c.skip is None]
    repeats = {}
    for case in active:  # warm-up, also used for the checks
        start = time.perf_counter()
        case.run(problem, args.damping, check=True)
        slow = time.perf_counter() - start > args.slow_case
        repeats[id(case)] = 1 if slow else args.repeats
    for rep in range(args.repeats):
        for case in active:
            if rep < repeats[id(case)]:
                case.run(problem, args.damping)
    exact = next((c for c in active if c.method == "exact"), None)
    rows = []
    for case in cases:
        variant = variant_name(case.method, case.options)
        if case.method == "woodbury" and "gram_route" not in case.options and case.gram_route:
            variant = (variant + ", " if variant else "") + f"gram_route=auto→{case.gram_route}"
        vs_exact = None
        if exact is not None and case.solution is not None and case is not exact:
            ref = exact.solution
            vs_exact = float((case.solution - ref).norm() / ref.norm())
        rows.append(
            {
                "case": problem.case,
                "layer": problem.label,
                "width": problem.width,
                "P": problem.size,
                "M": problem.rows,
                "T": problem.positions,
                "method": case.method,
                "variant": variant,
                "status": case.skip or "ok",
                "capture_s": problem.capture_s,
                "build_s": case.median("build"),
                "solve1_s": case.median("solve1"),
                "build_solve_s": case.median("build_solve"),
                "solve2_s": case.median("solve2"),
                "nbytes": case.nbytes,
                "residual": case.residual,
                "vs_exact": vs_exact,
                "repeats": len(case.samples),
                "samples": case.samples,
            }
        )
    return rows


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up (returned too)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def bench_gram(problem: Problem, args: argparse.Namespace) -> list[dict[str, Any]]:
    lc = problem.cap["0"]
    A, G = lc.A, lc.G
    rows_bytes = problem.rows * problem.size * A.element_size()
    base = {
        "case": problem.case,
        "layer": problem.label,
        "width": problem.width,
        "P": problem.size,
        "M": problem.rows,
        "T": problem.positions,
        "auto_route": choose_gram_route(A, G, "auto"),
    }
    cov_s, cov_times, k_cov = median_time(lambda: gram(A, G, "covariance"), args.repeats)
    out = {
        **base,
        "covariance_s": cov_s,
        "gradients_s": None,
        "ratio": None,
        "rel_diff": None,
        "status": "ok",
        "covariance_samples": cov_times,
        "gradients_samples": [],
    }
    if rows_bytes > args.max_gb * 1e9:
        out["status"] = f"gradients n/a (J = {gigabytes(rows_bytes)})"
        return [out]
    grad_s, grad_times, k_grad = median_time(lambda: gram(A, G, "gradients"), args.repeats)
    out.update(
        gradients_s=grad_s,
        ratio=grad_s / cov_s,
        rel_diff=float((k_cov - k_grad).abs().max() / k_grad.abs().max()),
        gradients_samples=grad_times,
    )
    return [out]


def bench_breakdown(problem: Problem, block_rows: list[dict], args: argparse.Namespace):
    """Pieces of the ``kfac``/``ekfac``/``woodbury`` times at one (the widest) Linear layer."""
    lc = problem.cap["0"]
    A, G, nu = lc.A, lc.G, problem.cap.normaliser
    omega, gamma = input_factor(A), gradient_factor(G, nu)
    _, u_gamma = symmetric_eigh(gamma)
    _, u_omega = symmetric_eigh(omega)
    pieces: list[tuple[str, str, Callable[[], Any]]] = [
        ("kfac/ekfac", "input_factor(A) (Ω)", lambda: input_factor(A)),
        ("kfac/ekfac", "gradient_factor(G) (Γ)", lambda: gradient_factor(G, nu)),
        ("kfac/ekfac", "symmetric_eigh(Ω) (float64 inside)", lambda: symmetric_eigh(omega)),
        ("kfac/ekfac", "symmetric_eigh(Γ) (float64 inside)", lambda: symmetric_eigh(gamma)),
    ]
    if omega.dtype == torch.float32:
        pieces.append(
            ("reference", "torch.linalg.eigh(Ω) in float32", lambda: torch.linalg.eigh(omega))
        )
    pieces.append(
        (
            "ekfac",
            "kfe_scalings(A, G, U_Γ, U_Ω)",
            lambda: kfe_scalings(A, G, u_gamma, u_omega, nu),
        )
    )

    def scalings_matmul() -> Tensor:  # T = 1: s = Σ_n (Σ_r (G U_Γ)²) ⊗ (A U_Ω)²
        g2 = (G[:, :, 0] @ u_gamma).square().sum(0)  # [N, d_out]
        a2 = (A[:, 0] @ u_omega).square()  # [N, D]
        return g2.T @ a2 / nu

    if problem.positions == 1:
        pieces.append(("reference", "same scalings as one matmul, T = 1:", scalings_matmul))
    pieces += [
        ("woodbury", "gram(A, G, 'covariance')", lambda: gram(A, G, "covariance")),
        ("woodbury", "symmetric_eigh(K)", lambda: symmetric_eigh(gram(A, G, "covariance"))),
    ]
    # The parameter-order ↔ Kronecker-order reorder every public solve() pays (private
    # helpers of CurvatureBlock, timed here as a diagnostic), and a plain reshape/cat of views
    # (the floor for it).
    block = build("woodbury", problem.cap)["0"]
    block.solve(problem.grad, damping=args.damping)  # Gram and its eigh out of the way
    d_out, width = block.kron_shape
    n_w = d_out * (width - block.layer.has_bias)

    def reorder_index() -> Tensor:
        kron, vector = block._to_kron(problem.grad)
        return block._to_param(kron, vector)

    def reorder_views() -> Tensor:  # Linear with bias only: [W | b] from views and back
        v = problem.grad
        kron = torch.cat([v[:n_w].reshape(d_out, -1), v[n_w:, None]], 1)
        return torch.cat([kron[:, :-1].reshape(-1), kron[:, -1]])

    pieces += [
        ("woodbury", "solve() (amortised, total)", lambda: block.solve(problem.grad, args.damping)),
        ("woodbury", "_to_kron + _to_param (parameter ↔ Kronecker order)", reorder_index),
    ]
    if problem.case == "linear" and block.layer.has_bias:
        pieces.append(("reference", "same reorder by plain reshape/cat", reorder_views))
    out = []
    for owner, what, fn in pieces:
        seconds, _, result = median_time(fn, args.repeats)
        out.append(
            {
                "width": problem.width,
                "part_of": owner,
                "piece": what,
                "seconds": seconds,
                "bytes": None,
            }
        )
        if what.startswith("same scalings"):
            ref = kfe_scalings(A, G, u_gamma, u_omega, nu)
            out[-1]["piece"] += (
                f" (max rel diff {float((result - ref).abs().max() / ref.abs().max()):.1e})"
            )
    totals = {
        r["method"]: r for r in block_rows if r["width"] == problem.width and r["case"] == "linear"
    }
    by_piece = {r["piece"]: r["seconds"] for r in out}
    shares = {}
    if "ekfac" in totals and totals["ekfac"]["build_s"]:
        shares["kfe_scalings / ekfac build"] = (
            by_piece["kfe_scalings(A, G, U_Γ, U_Ω)"] / totals["ekfac"]["build_s"]
        )
    if "kfac" in totals and totals["kfac"]["build_solve_s"]:
        eighs = (
            by_piece["symmetric_eigh(Ω) (float64 inside)"]
            + by_piece["symmetric_eigh(Γ) (float64 inside)"]
        )
        shares["both symmetric_eigh / kfac build+solve"] = eighs / totals["kfac"]["build_solve_s"]
    if "solve() (amortised, total)" in by_piece:
        shares["parameter ↔ Kronecker reorder / woodbury second solve"] = (
            by_piece["_to_kron + _to_param (parameter ↔ Kronecker order)"]
            / by_piece["solve() (amortised, total)"]
        )
    index = block.layer.kron_to_param_index()
    out.append(
        {
            "width": problem.width,
            "part_of": "memory",
            "piece": f"kron_to_param_index, built only by to_dense(), not in nbytes "
            f"(woodbury nbytes {block.nbytes / 2**20:.3g} MiB)",
            "seconds": None,
            "bytes": index.numel() * index.element_size(),
        }
    )
    return out, shares


# ------------------------------------------------------------------------------- summary
def crossover(rows: list[dict[str, Any]], key: str) -> int | None:
    """Smallest width where ``woodbury``'s ``key`` time is below ``kfac``'s."""
    times: dict[str, dict[int, float]] = {"kfac": {}, "woodbury": {}}
    for r in rows:
        if r["case"] == "linear" and r["method"] in times and r[key] is not None:
            times[r["method"]][r["width"]] = r[key]
    for width in sorted(times["kfac"]):
        if width in times["woodbury"] and times["woodbury"][width] < times["kfac"][width]:
            return width
    return None


def margins(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """``woodbury`` time / ``kfac`` time per Linear width (below 1: woodbury is faster)."""
    times: dict[tuple[str, int], float] = {
        (r["method"], r["width"]): r[key] for r in rows if r["case"] == "linear" and r[key]
    }
    return {
        str(w): times[("woodbury", w)] / times[("kfac", w)]
        for (method, w) in times
        if method == "kfac" and ("woodbury", w) in times
    }


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except OSError:  # pragma: no cover - git missing
        commit = ""
    return {
        "processor": platform.processor(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "fisherlab": getattr(fl, "__version__", "?"),
        "git_commit": commit,
        "dtype": args.dtype,
        "fisher_type": args.fisher_type,
        "batch": args.batch,
        "damping": args.damping,
        "repeats": args.repeats,
        "widths": args.widths,
        "conv": {"channels": args.conv_channels, "side": args.conv_side},
        "exact_max_p": args.exact_max_p,
        "slow_case_s": args.slow_case,
        "load_average_start": os.getloadavg(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def block_table(rows: list[dict[str, Any]]) -> str:
    shown = []
    for r in rows:
        shown.append(
            {
                "layer": r["layer"],
                "P": r["P"],
                "M": r["M"],
                "method": r["method"] + (f" [{r['variant']}]" if r["variant"] else ""),
                "build s": fmt_s(r["build_s"]),
                "solve1 s": fmt_s(r["solve1_s"]),
                "build+solve1 s": fmt_s(r["build_solve_s"]) if r["status"] == "ok" else r["status"],
                "solve2 s": fmt_s(r["solve2_s"]),
                "memory": "—" if r["nbytes"] is None else f"{r['nbytes'] / 2**20:.3g} MiB",
                "residual": "—" if r["residual"] is None else f"{r['residual']:.1e}",
                "vs exact": "—" if r["vs_exact"] is None else f"{r['vs_exact']:.1e}",
            }
        )
    return format_table(shown)


def gram_table(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            "layer": r["layer"],
            "P": r["P"],
            "M": r["M"],
            "T": r["T"],
            "covariance s": fmt_s(r["covariance_s"]),
            "gradients s": fmt_s(r["gradients_s"]),
            "ratio grad/cov": "—" if r["ratio"] is None else f"{r['ratio']:.3g}",
            "max rel diff": "—" if r["rel_diff"] is None else f"{r['rel_diff']:.1e}",
            "auto picks": r["auto_route"],
            "status": r["status"],
        }
        for r in rows
    ]
    return format_table(shown)


# ------------------------------------------------------------------------------- outputs
def write_csv(path: Path, tables: dict[str, list[dict[str, Any]]]) -> None:
    """One CSV for all tables: a ``table`` column, then the union of the tables' columns."""
    fields: list[str] = ["table"]
    for rows in tables.values():
        for r in rows:
            fields += [k for k in r if k not in fields and not k.endswith("samples")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, rows in tables.items():
            for r in rows:
                writer.writerow({"table": name, **r})


def plot(path: Path, blocks: list[dict], grams: list[dict], cross: int | None, meta: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    linear = [r for r in blocks if r["case"] == "linear" and r["status"] == "ok"]
    for method in ("exact", "kfac", "ekfac", "skfac", "woodbury"):
        pts = sorted((r["width"], r["build_solve_s"]) for r in linear if r["method"] == method)
        if pts:
            left.plot(
                *zip(*pts),
                marker=MARKERS[method],
                color=COLOURS[method],
                label=method,
                linestyle="--" if method == "ekfac" else "-",
                linewidth=1.8,
                markersize=5,
            )
    caps = sorted({(r["width"], r["capture_s"]) for r in linear})
    left.plot(*zip(*caps), color="0.6", linestyle="--", linewidth=1.2, label="capture (shared)")
    if cross is not None:
        left.axvline(cross, color=COLOURS["woodbury"], linestyle=":", linewidth=1.2)
        left.annotate(
            f"woodbury < kfac\nfrom d = {cross}",
            xy=(cross, 0.5),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color=COLOURS["woodbury"],
        )
    left.set_title(f"Build + first solve, Linear(d, d), batch {meta['batch']}")
    left.set_ylabel("time (s, log scale)")
    for route in ("covariance", "gradients"):
        key = f"{route}_s"
        pts = sorted((r["width"], r[key]) for r in grams if r["case"] == "linear" and r[key])
        if pts:
            right.plot(
                *zip(*pts),
                marker="o",
                color=COLOURS[route],
                label=f"{route} ({'factors' if route == 'covariance' else 'JJᵀ'})",
                linewidth=1.8,
                markersize=5,
            )
    right.set_title(f"Woodbury Gram K = JJᵀ ({grams[0]['M']}×{grams[0]['M']}) by route")
    right.set_ylabel("time (s, log scale)")
    widths = sorted({r["width"] for r in linear})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("layer width d = d_in = d_out (log₂ scale)")
        ax.legend(
            frameon=False, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16)
        )
    fig.suptitle(
        f"fisherlab curvature blocks — {meta['dtype']}, {meta['fisher_type']} Fisher, "
        f"{meta['torch_threads']} thread(s), torch {meta['torch']}",
        fontsize=10,
    )
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256, 512, 1024, 2048],
        help="d_in = d_out of the Linear layer",
    )
    parser.add_argument("--batch", type=int, default=128, help="N, samples per batch")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32", help="model and data dtype"
    )
    parser.add_argument(
        "--fisher-type",
        choices=["empirical", "true", "mc"],
        default="empirical",
        help="rows per sample R: 1, C=10, 1",
    )
    parser.add_argument("--damping", type=float, default=1e-3, help="λ of every solve")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    parser.add_argument("--conv-channels", type=int, default=16, help="Conv2d in = out channels")
    parser.add_argument("--conv-side", type=int, default=8, help="input height = width")
    parser.add_argument(
        "--exact-max-p", type=int, default=5000, help="largest P for the dense exact block"
    )
    parser.add_argument(
        "--max-gb", type=float, default=4.0, help="largest explicit J for the 'gradients' Gram"
    )
    parser.add_argument(
        "--slow-case",
        type=float,
        default=30.0,
        help="a case whose warm-up takes longer (seconds) is timed once, not --repeats times",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="weights, inputs and labels")
    parser.add_argument(
        "--quick", action="store_true", help="widths 32 and 64, small conv, exact up to P=1200"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--out", type=Path, default=None, help="output stem (no suffix)")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.conv_channels, args.conv_side = [32, 64], 4, 4
        args.exact_max_p = min(args.exact_max_p, 1200)
    if args.out is None:
        args.out = RESULTS / ("bench_blocks_quick" if args.quick else "bench_blocks")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    meta = machine_info(args)
    if meta["load_average_start"][0] > (os.cpu_count() or 1):
        print(
            f"warning: load average {meta['load_average_start'][0]:.1f} exceeds the "
            f"{os.cpu_count()} CPUs: other processes compete with the timed code",
            flush=True,
        )
    started, cpu_started = time.perf_counter(), time.process_time()
    block_rows: list[dict[str, Any]] = []
    gram_rows: list[dict[str, Any]] = []
    breakdown_rows: list[dict[str, Any]] = []
    shares: dict[str, float] = {}
    widths = sorted(args.widths)
    for width in widths:
        problem = linear_problem(
            width, args.batch, dtype, args.fisher_type, args.seed, args.repeats
        )
        block_rows += bench_problem(problem, LINEAR_METHODS, args)
        gram_rows += bench_gram(problem, args)
        if width == widths[-1]:
            breakdown_rows, shares = bench_breakdown(problem, block_rows, args)
        print(f"  width {width}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    conv = conv_problem(
        args.conv_channels,
        args.conv_side,
        args.batch,
        dtype,
        args.fisher_type,
        args.seed,
        args.repeats,
    )
    block_rows += bench_problem(conv, CONV_METHODS, args)
    gram_rows += bench_gram(conv, args)
    print(f"  conv: done ({time.perf_counter() - started:.0f} s)", flush=True)

    summary = {
        "crossover_build_solve": crossover(block_rows, "build_solve_s"),
        "crossover_second_solve": crossover(block_rows, "solve2_s"),
        "woodbury_over_kfac_build_solve": margins(block_rows, "build_solve_s"),
        "woodbury_over_kfac_second_solve": margins(block_rows, "solve2_s"),
        "gram_ratios": {
            (str(r["width"]) if r["case"] == "linear" else "conv"): r["ratio"] for r in gram_rows
        },
        "shares": shares,
        "total_s": time.perf_counter() - started,
    }
    meta["load_average_end"] = os.getloadavg()
    # CPU seconds this process got per wall second and thread: near 1 on an idle machine, far
    # lower when other processes compete for the cores (then the timings are inflated).
    meta["cpu_share"] = (time.process_time() - cpu_started) / (
        summary["total_s"] * torch.get_num_threads()
    )

    print(
        f"\n{meta['command']}  |  {meta['processor'] or meta['platform']}, "
        f"torch threads {meta['torch_threads']}, torch {meta['torch']}, {args.dtype}, "
        f"{args.fisher_type} Fisher, batch {args.batch}, damping {args.damping}, "
        f"median of {args.repeats}"
    )
    print(
        f"load average start {meta['load_average_start']}, end {meta['load_average_end']}; "
        f"CPU share {meta['cpu_share']:.2f} of {torch.get_num_threads()} threads "
        "(near 1 when the machine is otherwise idle; much lower: other processes competed)\n"
    )
    print(
        "Linear layer (first layer of Linear(d, d) → Tanh → Linear(d, 10)); capture s:",
        ", ".join(
            f"d={r['width']}: {r['capture_s']:.3g}"
            for r in block_rows
            if r["case"] == "linear" and r["method"] == "kfac"
        ),
    )
    print(block_table([r for r in block_rows if r["case"] == "linear"]))
    print(f"\nConv2d layer; capture {conv.capture_s:.3g} s")
    print(block_table([r for r in block_rows if r["case"] == "conv"]))
    print("\nWoodbury Gram K = JJᵀ: covariance factors vs explicit per-sample gradients")
    print(gram_table(gram_rows))
    print(f"\nBreak-down at d = {widths[-1]}")
    print(
        format_table(
            [
                {
                    "part of": r["part_of"],
                    "piece": r["piece"],
                    "seconds": fmt_s(r["seconds"]),
                    "bytes": "—" if r["bytes"] is None else f"{r['bytes'] / 2**20:.3g} MiB",
                }
                for r in breakdown_rows
            ]
        )
    )
    for name, value in shares.items():
        print(f"  share {name}: {value:.0%}")
    for key, text in (
        ("crossover_build_solve", "build + first solve"),
        ("crossover_second_solve", "second (amortised) solve"),
    ):
        width = summary[key]
        ratios = summary[key.replace("crossover", "woodbury_over_kfac")]
        print(
            f"woodbury overtakes kfac ({text}): "
            + (f"from d = {width}" if width else f"not within d ≤ {widths[-1]}")
            + "; woodbury/kfac time by width: "
            + ", ".join(f"{w}: {r:.2g}" for w, r in ratios.items())
        )
    print(f"total {summary['total_s']:.0f} s")

    result = {
        "meta": meta,
        "summary": summary,
        "blocks": block_rows,
        "gram": gram_rows,
        "breakdown": breakdown_rows,
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(
        out.with_suffix(".csv"),
        {"blocks": block_rows, "gram": gram_rows, "breakdown": breakdown_rows},
    )
    written = [out.with_suffix(".json"), out.with_suffix(".csv")]
    if not args.no_plot:
        plot(out.with_suffix(".png"), block_rows, gram_rows, summary["crossover_build_solve"], meta)
        written.append(out.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written))
    return result


if __name__ == "__main__":
    main()
