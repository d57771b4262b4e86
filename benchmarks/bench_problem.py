r"""Curvature of a whole data set: fisherlab's streamed blocks against curvlinops, and memory in N.

Protocol (``python benchmarks/bench_problem.py``):

* **Time.** The digits training set (1,437 images, float64) as one list of batches of 128 (the
  last one short), the true Fisher of ``CrossEntropyLoss``, two tanh MLPs at their seeded
  initialisation: 64-32-16-10 and 64-128-64-10. For each, the same batch list goes to

  - ``exact``: ``fl.exact_blocks(problem)`` (BackPACK rows, Gram accumulated per batch) against
    curvlinops' ``GGNLinearOperator`` per layer times the identity (in column chunks);
  - ``kfac``: ``fl.curvature("kfac", problem)`` against ``KFACLinearOperator``'s
    ``compute_kronecker_factors()`` (``type-2``, ``expand``, weight and bias joint);
  - ``ekfac``: ``fl.curvature("ekfac", problem)`` against ``EKFACLinearOperator``'s factors and
    eigenvalue correction.

  Median of ``--repeats`` timings of each, in one run; the ratio is fisherlab ÷ curvlinops
  (below 1: fisherlab is faster). Every fisherlab block is checked against the peer's dense
  matrix (max relative difference printed).
* **Memory.** Peak resident memory of a fresh process that builds one method over ``N``
  samples of the MLP 64-128-64-10 (true Fisher, batches of 128), minus the same process's
  resident memory just before the computation (imports, model and data loaded): ``N`` = 256,
  1,437 (digits) and 20,000 (synthetic inputs of the digits' shape, random labels). ``exact``,
  ``kfac``, ``ekfac`` and ``diag`` hold sums of fixed size (flat in ``N``); ``ekfac`` also keeps
  its first pass's captures for the second, up to the problem's ``cache_bytes`` (256 MiB;
  ``ekfac/no-cache``: ``cache_bytes=0``, two capture passes); ``woodbury`` and ``skfac`` hold
  per-sample rows (they grow, and are refused beyond the budget). Children run with
  ``MALLOC_MMAP_THRESHOLD_=131072``, so that freed large blocks go back to the system and the
  resident memory is what is held.

Results: ``benchmarks/results/bench_problem.{json,csv}`` with the machine, threads and
versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fisherlab as fl

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"mlp-64-32-16-10": (32, 16), "mlp-64-128-64-10": (128, 64)}


def _problem(hidden, samples: int | None = None, synthetic: int = 0, batch_size: int = 128):
    torch.manual_seed(0)
    model = fl.models.mlp(64, hidden, 10).double().eval()
    if synthetic:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(synthetic, 1, 8, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (synthetic,), generator=generator)
    else:
        split = fl.data.load_digits(dtype=torch.float64)
        x, y = split.x_train[:samples], split.y_train[:samples]
    batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return model, nn.CrossEntropyLoss(), batches


def _median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _peer_exact(model, loss_fn, batches, names, chunk: int = 1024):
    import curvlinops

    blocks = {}
    for name in names:
        params = list(model.get_submodule(name).parameters())
        op = curvlinops.GGNLinearOperator(
            model, loss_fn, params, batches, check_deterministic=False
        )
        size = sum(p.numel() for p in params)
        cols = []
        for start in range(0, size, chunk):
            eye = torch.zeros(size, min(chunk, size - start), dtype=torch.float64)
            eye[start : start + chunk].fill_diagonal_(1.0)
            cols.append(op @ eye)
        blocks[name] = torch.cat(cols, dim=1)
    return blocks


def _peer_kfac(model, loss_fn, batches, names, ekfac: bool):
    import curvlinops

    cls = curvlinops.EKFACLinearOperator if ekfac else curvlinops.KFACLinearOperator
    ops = {}
    for name in names:
        params = list(model.get_submodule(name).parameters())
        op = cls(
            model,
            loss_fn,
            params,
            batches,
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        op.compute_kronecker_factors()
        if ekfac:
            op.compute_eigenvalue_correction()
        ops[name] = op
    return ops


def time_rows(repeats: int) -> list[dict]:
    rows = []
    for model_name, hidden in MODELS.items():
        model, loss_fn, batches = _problem(hidden)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

        def problem(model=model, loss_fn=loss_fn, batches=batches):
            return fl.Problem(model, loss_fn, batches, progress=False)

        runs = {
            "exact": (
                lambda problem=problem: fl.exact_blocks(problem()),
                lambda m=model, lf=loss_fn, b=batches, n=names: _peer_exact(m, lf, b, n),
            ),
            "kfac": (
                lambda problem=problem: fl.curvature("kfac", problem()),
                lambda m=model, lf=loss_fn, b=batches, n=names: _peer_kfac(m, lf, b, n, False),
            ),
            "ekfac": (
                lambda problem=problem: fl.curvature("ekfac", problem()),
                lambda m=model, lf=loss_fn, b=batches, n=names: _peer_kfac(m, lf, b, n, True),
            ),
        }
        for method, (ours, peer) in runs.items():
            ours_s, ours_all, ours_result = _median_time(ours, repeats)
            peer_repeats = repeats if method != "exact" or hidden[0] < 100 else 1
            peer_s, peer_all, peer_result = _median_time(peer, peer_repeats)
            diff = 0.0
            for name in names:
                mine = ours_result[name]
                mine = mine if isinstance(mine, torch.Tensor) else mine.to_dense()
                theirs = peer_result[name]
                if not isinstance(theirs, torch.Tensor):
                    theirs = theirs @ torch.eye(mine.shape[0], dtype=torch.float64)
                diff = max(diff, _rel(mine, theirs))
            row = {
                "model": model_name,
                "method": method,
                "samples": sum(len(b[0]) for b in batches),
                "batches": len(batches),
                "fisherlab_s": ours_s,
                "curvlinops_s": peer_s,
                "ratio": ours_s / peer_s,
                "max_rel_diff": diff,
                "fisherlab_times": ours_all,
                "curvlinops_times": peer_all,
            }
            print(
                f"{model_name:18s} {method:6s} fisherlab {ours_s:8.3f} s  curvlinops "
                f"{peer_s:8.3f} s  ratio {row['ratio']:.3f}  max rel diff {diff:.1e}",
                flush=True,
            )
            rows.append(row)
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(method: str, samples: int) -> None:
    """Run in a fresh process: print the resident memory before and the peak after."""
    synthetic = samples if samples > 1437 else 0
    model, loss_fn, batches = _problem(MODELS["mlp-64-128-64-10"], samples, synthetic)
    method, _, variant = method.partition("/")
    cache = {"": 2**28, "no-cache": 0}[variant]
    problem = fl.Problem(model, loss_fn, batches, progress=False, cache_bytes=cache)
    before = _rss_bytes()
    status = "ok"
    try:
        if method == "exact_blocks":
            fl.exact_blocks(problem)
        else:
            fl.curvature(method, problem)
    except fl.MemoryBudgetError as err:
        status = "refused: " + str(err).split(";")[0]
    print(json.dumps({"before": before, "peak": _peak_bytes(), "status": status}))


def _peak_bytes() -> int:
    """The process's peak resident memory (``VmHWM``; unlike ``ru_maxrss``, it is not
    inherited from the parent that spawned the process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_rows(samples: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        for n in samples:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", method, str(n)],
                capture_output=True,
                text=True,
                check=True,
                # large blocks mmapped and returned on free: the resident memory is what is
                # held, not what glibc's heap kept from earlier, differently sized batches
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row = {
                "method": method,
                "samples": n,
                "peak_mib": result["peak"] / 2**20,
                "above_baseline_mib": (result["peak"] - result["before"]) / 2**20,
                "status": result["status"],
            }
            print(
                f"{method:12s} N={n:6d}  peak {row['peak_mib']:8.1f} MiB  above baseline "
                f"{row['above_baseline_mib']:8.1f} MiB  {row['status']}",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 1437, 20000])
    parser.add_argument(
        "--memory-methods",
        nargs="+",
        default=[
            "exact_blocks",
            "exact",
            "kfac",
            "ekfac",
            "ekfac/no-cache",
            "diag",
            "woodbury",
            "skfac",
        ],
    )
    parser.add_argument(
        "--skip-time",
        action="store_true",
        help="memory only; keep the last run's timings and the memory rows not measured again",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    import curvlinops

    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "curvlinops": getattr(curvlinops, "__version__", "?"),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "protocol": __doc__,
    }
    out = RESULTS / "bench_problem.json"
    previous = json.loads(out.read_text()) if out.exists() else {"time": [], "memory": []}
    if args.skip_time:  # keep the timings of the last full run
        timing = previous["time"]
    else:
        timing = time_rows(args.repeats)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "time": timing, "memory": []}, indent=2) + "\n")
    memory = memory_rows(args.samples, args.memory_methods)
    if args.skip_time:  # rows of methods and sizes not measured again are kept
        measured = {(r["method"], r["samples"]) for r in memory}
        kept = [r for r in previous["memory"] if (r["method"], r["samples"]) not in measured]
        memory = kept + memory
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "time": timing, "memory": memory}, indent=2) + "\n")
    with (RESULTS / "bench_problem.csv").open("w") as f:
        f.write("table,model,method,samples,value,unit,note\n")
        for r in timing:
            f.write(f"time,{r['model']},{r['method']},{r['samples']},{r['ratio']:.4g},ratio,\n")
        for r in memory:
            f.write(
                f"memory,mlp-64-128-64-10,{r['method']},{r['samples']},"
                f"{r['above_baseline_mib']:.1f},MiB,{r['status'].replace(',', ';')}\n"
            )
    print(f"saved {out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
