r"""Time ``fisherlab.exact_blocks`` (true Fisher) against BackPACK, torch.func and curvlinops.

What is measured, all in one process and one run (so every ratio compares like with like):

* ``fisherlab``: ``fl.exact_blocks(model, CrossEntropyLoss(), x, y, fisher_type="true")``.
* ``backpack direct``: BackPACK used directly on an extended copy of the model,
  ``with backpack(SqrtGGNExact()): loss.backward()``, then ``S.T @ S`` per layer with ``S`` the
  ``[C·N, P]`` square-root factor (weight and bias concatenated).
* ``torch.func brute force``: per-sample Jacobians ``vmap(jacrev(functional_call(...)))`` of the
  logits w.r.t. each layer's parameters and per-sample loss Hessians ``vmap(hessian(...))``;
  the block is ``(1/N) Σ_n J_nᵀ H_n J_n``.
* ``curvlinops`` (if installed): ``GGNLinearOperator`` restricted to one layer's parameters,
  multiplied onto identity columns. Layers wider than ``--curvlinops-cols`` are timed on that
  many columns and extrapolated linearly to all ``P`` columns (marked in the output).
* ``matmul A.T @ A``: a plain product with ``A`` of the square-root factor's shape
  ``[C·N, max P]``, the machine's reference throughput.
* Break-down rows: the BackPACK backward pass alone, and ``symmetric_gram`` / ``S.T @ S`` on
  the real square-root factors (optionally for several tile widths, ``--tiles``).

GFLOP/s columns: "useful" counts the full products ``2·M·ΣP²`` (``M = C·N``) whatever a method
executes; "executed" counts what a Gram routine actually multiplies (the upper tiles only for
``symmetric_gram``). Every block is checked against fisherlab's (max abs difference printed).

Timing: one warm-up call per case (also used for the checks), then ``--repeats`` calls taken
round-robin over the cases, so background load hits all cases alike; the median is reported.

Run::

    python benchmarks/bench_exact.py                              # float64, full size
    python benchmarks/bench_exact.py --dtype float64 float32      # both dtypes, one file
    python benchmarks/bench_exact.py --quick                      # seconds-long smoke test

Results go to ``benchmarks/results/bench_exact.{json,csv}`` (``bench_exact_quick.*`` with
``--quick``; change with ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import fisherlab as fl
from fisherlab.linalg import symmetric_gram

RESULTS = Path(__file__).resolve().parent / "results"
Blocks = dict[str, Tensor]


# ------------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Setup:
    """The benchmarked problem."""

    model: nn.Sequential
    loss_fn: nn.Module
    x: Tensor
    y: Tensor
    layers: dict[str, nn.Linear]
    sizes: dict[str, int]  # P per layer
    m: int  # rows of the square-root factor, C·N


def make_setup(hidden: tuple[int, ...], batch: int, dtype: torch.dtype, seed: int) -> Setup:
    torch.manual_seed(seed)
    model = fl.models.mlp(64, hidden, 10, activation="tanh").to(dtype)
    data = fl.data.load_digits(dtype=dtype)
    x, y = data.x_train[:batch], data.y_train[:batch]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in layers.items()}
    return Setup(model, nn.CrossEntropyLoss(), x, y, layers, sizes, m=10 * batch)


# ------------------------------------------------------------------------------- methods
def run_fisherlab(s: Setup, backend: str = "auto") -> Blocks:
    return dict(fl.exact_blocks(s.model, s.loss_fn, s.x, s.y, "true", backend=backend))


class BackpackDirect:
    """BackPACK as a user would call it: extend once, ``SqrtGGNExact`` backward, ``SᵀS``."""

    def __init__(self, s: Setup):
        from backpack import extend

        self.s = s
        self.net = extend(copy.deepcopy(s.model))
        self.loss_fn = extend(copy.deepcopy(s.loss_fn))
        self.layers = {n: m for n, m in self.net.named_modules() if isinstance(m, nn.Linear)}

    def factors(self) -> Blocks:
        """``S [C·N, P]`` per layer, weight then bias, ``SᵀS`` the block."""
        from backpack import backpack
        from backpack.extensions import SqrtGGNExact

        self.net.zero_grad(set_to_none=True)
        with backpack(SqrtGGNExact()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            self.loss_fn(self.net(self.s.x), self.s.y).backward()
        out = {}
        for name, layer in self.layers.items():
            parts = [p.sqrt_ggn_exact.flatten(start_dim=2) for p in layer.parameters()]
            out[name] = torch.cat(parts, dim=2).flatten(end_dim=1)
        return out

    def blocks(self) -> Blocks:
        return {name: f.T @ f for name, f in self.factors().items()}


def run_brute_force(s: Setup) -> Blocks:
    """``(1/N) Σ_n J_nᵀ H_n J_n`` from full per-sample Jacobians and loss Hessians."""
    from torch.func import functional_call, hessian, jacrev, vmap

    params = {k: p.detach() for k, p in s.model.named_parameters()}
    wanted = {k: params[k] for name in s.layers for k in (f"{name}.weight", f"{name}.bias")}

    def logits(sub: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(s.model, {**params, **sub}, (xi.unsqueeze(0),)).squeeze(0)

    def sample_loss(z: Tensor, t: Tensor) -> Tensor:
        return nn.functional.cross_entropy(z, t)

    with torch.no_grad():
        out = s.model(s.x)
    jac = vmap(jacrev(logits), in_dims=(None, 0))(wanted, s.x)  # k -> [N, C, *shape]
    hess = vmap(hessian(sample_loss))(out, s.y)  # [N, C, C]
    n = s.x.shape[0]
    blocks = {}
    for name in s.layers:
        j = torch.cat([jac[f"{name}.{p}"].flatten(start_dim=2) for p in ("weight", "bias")], 2)
        blocks[name] = j.flatten(end_dim=1).T @ (hess @ j).flatten(end_dim=1) / n
    return blocks


class Curvlinops:
    """One ``GGNLinearOperator`` per layer, multiplied onto (a subset of) identity columns."""

    def __init__(self, s: Setup, max_cols: int):
        from curvlinops import GGNLinearOperator

        self.ops = {
            name: GGNLinearOperator(
                s.model,
                s.loss_fn,
                list(layer.parameters()),
                [(s.x, s.y)],
                check_deterministic=False,
            )
            for name, layer in s.layers.items()
        }
        self.cols = {n: p if max_cols <= 0 else min(p, max_cols) for n, p in s.sizes.items()}
        self.eye = {n: torch.eye(p, self.cols[n], dtype=s.x.dtype) for n, p in s.sizes.items()}
        self.last: dict[str, float] = {}

    def blocks(self) -> Blocks:
        """Columns ``[P, cols]`` per layer; per-layer times go to ``self.last``."""
        out = {}
        for name, op in self.ops.items():
            t0 = time.perf_counter()
            out[name] = op @ self.eye[name]
            self.last[name] = time.perf_counter() - t0
        return out

    def extrapolated(self, sizes: dict[str, int]) -> float:
        """Time of the last call scaled per layer to all ``P`` columns."""
        return sum(t * sizes[n] / self.cols[n] for n, t in self.last.items())


# ------------------------------------------------------------------------------- timing
@dataclass
class Row:
    """One line of the results table."""

    dtype: str
    name: str
    seconds: float
    times: list[float]  # reported seconds per repeat (extrapolated where marked)
    measured_times: list[float]  # wall seconds per repeat as measured
    useful_gflop: float
    executed_gflop: float
    ratio_to_fisherlab: float = float("nan")  # seconds / fisherlab seconds
    max_abs_diff: float | None = None  # against fisherlab's blocks
    max_rel_diff: float | None = None
    extrapolated: bool = False
    note: str = ""

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def gflops_useful(self) -> float:
        return self.useful_gflop / self.seconds if self.useful_gflop else float("nan")

    @property
    def gflops_executed(self) -> float:
        return self.executed_gflop / self.seconds if self.executed_gflop else float("nan")


@dataclass
class Case:
    """A timed callable; ``seconds_of`` turns its measured wall time into the reported one."""

    name: str
    fn: Callable[[], object]
    useful_gflop: float
    executed_gflop: float
    note: str = ""
    check: bool = True  # compare the warm-up output with fisherlab's blocks
    check_cols: dict[str, int] | None = None  # leading columns to compare (default all)
    extrapolated: bool = False
    seconds_of: Callable[[float], float] = field(default=lambda t: t)
    times: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)  # wall times before ``seconds_of``


def gram_gflop(m: int, p: int, tile: int | None) -> float:
    """GFLOP executed by ``symmetric_gram(rows[m, p], tile)`` (``tile=None``: full product)."""
    if tile is None or p <= tile:
        return 2 * m * p * p / 1e9
    return sum(2 * m * min(tile, p - i) * (p - i) for i in range(0, p, tile)) / 1e9


def compare(ref: Blocks, got: Blocks, cols: dict[str, int] | None = None) -> tuple[float, float]:
    """Max abs and max relative (to ``max |ref|``) difference, over ``cols`` leading columns."""
    diff, scale = 0.0, 0.0
    for name, r in ref.items():
        k = r.shape[1] if cols is None else cols[name]
        diff = max(diff, float((got[name][:, :k] - r[:, :k]).abs().max()))
        scale = max(scale, float(r.abs().max()))
    return diff, diff / scale


def machine_info() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "processor": platform.processor(),
        "cpu_model": cpu,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "backpack-for-pytorch": version("backpack-for-pytorch"),
        "curvlinops-for-pytorch": version("curvlinops-for-pytorch"),
        "fisherlab": fl.__version__,
    }


def bench_dtype(args: argparse.Namespace, dtype_name: str) -> tuple[list[Row], dict]:
    dtype = getattr(torch, dtype_name)
    s = make_setup(args.hidden, args.batch, dtype, args.seed)
    m, sizes = s.m, s.sizes
    useful = sum(gram_gflop(m, p, None) for p in sizes.values())
    default_tile = inspect.signature(symmetric_gram).parameters["tile"].default
    p_max = max(sizes.values())
    print(
        f"\n== {dtype_name}: MLP 64-{'-'.join(map(str, args.hidden))}-10, batch {args.batch}, "
        f"M = C·N = {m}, block sizes {list(sizes.values())}, full products {useful:.1f} GFLOP"
    )

    # ---- warm-up calls, which also give the blocks to check
    t0 = time.perf_counter()
    ref = fl.exact_blocks(s.model, s.loss_fn, s.x, s.y, "true")
    backend = ref.backend
    ref = dict(ref)
    print(f"fisherlab warm-up {time.perf_counter() - t0:.2f}s (backend {backend!r})")
    direct = BackpackDirect(s)
    factors = direct.factors()
    a = torch.randn(m, p_max, dtype=dtype)

    cases = [
        Case(
            "fisherlab exact_blocks",
            lambda: run_fisherlab(s),
            useful,
            sum(gram_gflop(m, p, default_tile) for p in sizes.values()),
            note=f"backend={backend}; exec. = symmetric_gram's products",
        ),
        Case("backpack direct (SᵀS)", direct.blocks, useful, useful),
        Case("torch.func brute force", lambda: run_brute_force(s), useful, useful),
    ]
    if not args.skip_torch_func_backend:
        cases.append(
            Case(
                "fisherlab backend=torch.func",
                lambda: run_fisherlab(s, "torch.func"),
                useful,
                useful,
            )
        )
    cl = None
    if importlib.util.find_spec("curvlinops") is None:
        print("curvlinops not installed: skipped")
    else:
        cl = Curvlinops(s, 0 if args.curvlinops_full else args.curvlinops_cols)
        partial = {n: c for n, c in cl.cols.items() if c < sizes[n]}
        note = (
            "extrapolated linearly from "
            + ", ".join(f"{c} of {sizes[n]}" for n, c in partial.items())
            + " identity columns"
            if partial
            else "all identity columns"
        )
        cases.append(
            Case(
                "curvlinops GGNLinearOperator",
                cl.blocks,
                useful,
                useful,
                note=note,
                extrapolated=bool(partial),
                check_cols=cl.cols,
                seconds_of=lambda _t: cl.extrapolated(sizes),
            )
        )
    cases += [
        Case(
            f"matmul A.T @ A, A [{m}, {p_max}]",
            lambda: a.T @ a,
            gram_gflop(m, p_max, None),
            gram_gflop(m, p_max, None),
            note="reference",
            check=False,
        ),
        Case(
            "  BackPACK SqrtGGNExact backward only",
            direct.factors,
            0.0,
            0.0,
            note="square-root factors, no Gram",
            check=False,
        ),
        Case(
            f"  symmetric_gram on S (tile={default_tile})",
            lambda: {n: symmetric_gram(f) for n, f in factors.items()},
            useful,
            sum(gram_gflop(m, p, default_tile) for p in sizes.values()),
        ),
        Case("  S.T @ S on S", lambda: {n: f.T @ f for n, f in factors.items()}, useful, useful),
    ]
    for tile in args.tiles:
        if tile == default_tile:
            continue
        cases.append(
            Case(
                f"  symmetric_gram on S (tile={tile})",
                lambda tile=tile: {n: symmetric_gram(f, tile) for n, f in factors.items()},
                useful,
                sum(gram_gflop(m, p, tile) for p in sizes.values()),
            )
        )

    # ---- warm-up and checks of the remaining cases
    checks: dict[str, tuple[float, float]] = {}
    for case in cases[1:]:
        out = case.fn()
        if case.check:
            checks[case.name] = compare(ref, out, case.check_cols)  # type: ignore[arg-type]
        del out

    # ---- timed repeats, round-robin over the cases
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for case in cases:
            t0 = time.perf_counter()
            out = case.fn()
            case.measured.append(time.perf_counter() - t0)
            case.times.append(case.seconds_of(case.measured[-1]))
            del out
    load_after = os.getloadavg()

    rows = []
    for case in cases:
        diff = checks.get(case.name, (None, None))
        rows.append(
            Row(
                dtype_name,
                case.name,
                statistics.median(case.times),
                case.times,
                case.measured,
                case.useful_gflop,
                case.executed_gflop,
                max_abs_diff=diff[0],
                max_rel_diff=diff[1],
                extrapolated=case.extrapolated,
                note=case.note,
            )
        )
    for row in rows:
        row.ratio_to_fisherlab = row.seconds / rows[0].seconds
    info = {
        "dtype": dtype_name,
        "model": f"mlp 64-{'-'.join(map(str, args.hidden))}-10 tanh",
        "batch": args.batch,
        "m_rows": m,
        "block_sizes": sizes,
        "useful_gflop": useful,
        "fisherlab_backend": backend,
        "symmetric_gram_default_tile": default_tile,
        "loadavg_before_repeats": load_before,
        "loadavg_after_repeats": load_after,
        "aims": aims(rows, cl is not None),
    }
    return rows, info


def aims(rows: list[Row], have_curvlinops: bool) -> dict[str, dict[str, object]]:
    by = {r.name: r for r in rows}
    fisher = rows[0]
    direct = by["backpack direct (SᵀS)"]
    matmul = next(r for r in rows if r.name.startswith("matmul"))
    out: dict[str, dict[str, object]] = {
        "no slower than BackPACK direct": {
            "value": direct.seconds / fisher.seconds,
            "meaning": "BackPACK-direct seconds / fisherlab seconds (aim ≥ 1)",
            "met": direct.seconds >= fisher.seconds,
        },
        "≥70% of matmul throughput": {
            "value": fisher.gflops_useful / matmul.gflops_useful,
            "meaning": "fisherlab useful GFLOP/s / matmul GFLOP/s (aim ≥ 0.7)",
            "met": fisher.gflops_useful >= 0.7 * matmul.gflops_useful,
            "executed_ratio": fisher.gflops_executed / matmul.gflops_useful,
        },
    }
    if have_curvlinops:
        cl = by["curvlinops GGNLinearOperator"]
        out["≥3× faster than curvlinops"] = {
            "value": cl.seconds / fisher.seconds,
            "meaning": "curvlinops seconds / fisherlab seconds (aim ≥ 3)"
            + (", curvlinops extrapolated" if cl.extrapolated else ""),
            "met": cl.seconds >= 3 * fisher.seconds,
        }
    return out


# ------------------------------------------------------------------------------- output
def print_table(rows: list[Row], info: dict) -> None:
    head = (
        f"{'case':<44} {'median s':>9} {'min s':>7} {'×fisherlab':>10} {'GFLOP/s':>8} "
        f"{'exec.':>7}  "
    )
    print(head + "max |Δ| vs fisherlab   note")
    print("-" * (len(head) + 40))
    for r in rows:
        useful = f"{r.gflops_useful:8.1f}" if r.useful_gflop else f"{'–':>8}"
        executed = f"{r.gflops_executed:7.1f}" if r.executed_gflop else f"{'–':>7}"
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e} (rel {r.max_rel_diff:.0e})"
        name = r.name + (" *" if r.extrapolated else "")
        print(
            f"{name:<44} {r.seconds:9.3f} {r.best:7.3f} {r.ratio_to_fisherlab:10.2f} "
            f"{useful} "
            f"{executed}  {diff:<21}  {r.note}"
        )
    print(
        "Medians of the repeats; ×fisherlab = median / fisherlab's median; GFLOP/s counts the"
        " full products 2·M·ΣP², 'exec.' the products actually executed; * extrapolated."
    )
    print(
        "load average (1, 5, 15 min) before / after the repeats: "
        + " / ".join(
            ", ".join(f"{v:.2f}" for v in info[k])
            for k in ("loadavg_before_repeats", "loadavg_after_repeats")
        )
    )
    for name, aim in info["aims"].items():
        print(
            f"aim {name}: {aim['value']:.2f} ({aim['meaning']}) -> "
            f"{'MET' if aim['met'] else 'NOT MET'}"
        )


def save(path: Path, rows: list[Row], infos: list[dict], args: argparse.Namespace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "repeats": args.repeats,
        "runs": [
            {
                **info,
                "rows": [
                    {
                        **asdict(r),
                        "min_seconds": r.best,
                        "gflops_useful": r.gflops_useful,
                        "gflops_executed": r.gflops_executed,
                    }
                    for r in rows
                    if r.dtype == info["dtype"]
                ],
            }
            for info in infos
        ],
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    fields = [
        "dtype",
        "name",
        "seconds",
        "ratio_to_fisherlab",
        "gflops_useful",
        "gflops_executed",
        "useful_gflop",
        "executed_gflop",
        "max_abs_diff",
        "max_rel_diff",
        "extrapolated",
        "note",
    ]
    with path.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for r in rows:
            writer.writerow(
                [f"{v:.6g}" if isinstance(v, float) else v for v in (getattr(r, f) for f in fields)]
            )
    print(f"\nsaved {path.with_suffix('.json')} and {path.with_suffix('.csv')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time fisherlab.exact_blocks (true Fisher) against BackPACK used directly, "
        "a brute-force torch.func baseline, curvlinops and a plain matmul.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["float64", "float32"],
        default=["float64"],
        help="one or both dtypes, run in turn",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: MLP 64-32-16-10, batch 32"
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=None,
        help="hidden widths (default 128 64; 32 16 with --quick)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size (default 128; 32 with --quick)"
    )
    parser.add_argument(
        "--curvlinops-cols",
        type=int,
        default=1024,
        help="identity columns timed per layer; wider layers are extrapolated",
    )
    parser.add_argument(
        "--curvlinops-full", action="store_true", help="materialise curvlinops' blocks fully (slow)"
    )
    parser.add_argument(
        "--tiles",
        type=int,
        nargs="*",
        default=[512, 2048],
        help="extra symmetric_gram tile widths to time on the real factors",
    )
    parser.add_argument(
        "--skip-torch-func-backend",
        action="store_true",
        help="do not time fisherlab's backend='torch.func'",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (default results/bench_exact, "
        "results/bench_exact_quick with --quick)",
    )
    args = parser.parse_args(argv)
    args.hidden = tuple(args.hidden or ((32, 16) if args.quick else (128, 64)))
    args.batch = args.batch or (32 if args.quick else 128)
    if args.out is None:
        args.out = RESULTS / ("bench_exact_quick" if args.quick else "bench_exact")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(
        f"{info['cpu_model']} | {info['torch_num_threads']} threads | torch {info['torch']} | "
        f"backpack {info['backpack-for-pytorch']} | curvlinops {info['curvlinops-for-pytorch']}"
    )
    rows, infos = [], []
    for dtype_name in args.dtype:
        r, i = bench_dtype(args, dtype_name)
        print_table(r, i)
        rows += r
        infos.append(i)
    save(args.out, rows, infos, args)


if __name__ == "__main__":
    main()
