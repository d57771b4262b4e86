"""The optimizers' step with the kernels of issue 21 against their earlier versions, alternated.

The earlier versions (kept below as ``_legacy_*``) are patched in and out of the running library
in one process, so both variants see the same machine load: ``damped_inverse`` with its
identity matrix, full-matrix finiteness test and ``where``; the factor updates that form
``ÃᵀÃ`` and ``GᵀG``, divide them by ``ν`` and blend them into the running average in separate
allocating passes; the division of the factors by the running average's mass at every step;
the float64 copy of the Woodbury Gram shifted through an identity matrix; and the optimizers'
copy of every builder entry after each update (now only the entries that changed). ``--factor-dtype
float32`` times the new kernels with the factorisations in float32 (the optimizers'
``eigen_dtype``) against the earlier ones in float64; with ``--baseline float64`` against today's
kernels in float64 (the speed of float32 factorisations alone).

Models (as ``bench_optim.py``): ``mlp`` 784-512-256-10 and ``3c1f`` (3 conv + 1 FC) on 28×28
inputs, batch 128, cross-entropy, one thread by default. For each model and optimizer two
identical copies (same seed) are stepped, ``--rounds`` times a block of ``--block`` steps each,
old and new in turn (alternating which goes first); a block's mean is one sample, and the
ratio new ÷ old is taken within a round. Reported: the median ratio over rounds with its range.

Before timing, both variants take ``--check-steps`` steps from the same start (float32 and
float64 models) and the relative difference of their total parameter change is reported
(``rel_diff_f32``, ``rel_diff_f64``).

    python benchmarks/bench_kernels.py                 # ~10 min on one idle core
    python benchmarks/bench_kernels.py --models mlp --rounds 3 --block 10
    python benchmarks/bench_kernels.py --kernels      # damped_inverse and the factor update alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench_optim import mlp, three_conv_one_fc  # benchmarks/, beside this script
from torch import Tensor, nn

import fisherlab as fl
from fisherlab.blocks import base as blocks_base
from fisherlab.blocks import ekfac as blocks_ekfac
from fisherlab.blocks import factors as blocks_factors
from fisherlab.blocks import kfac as blocks_kfac
from fisherlab.blocks import woodbury as blocks_woodbury
from fisherlab.optim import kfac as optim_kfac
from fisherlab.report import format_table, save_table

RESULTS = Path(__file__).parent / "results"
MODELS = {"mlp": mlp, "3c1f": three_conv_one_fc}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "kfac-factored": lambda m, **kw: fl.optim.KFAC(m, damping_mode="factored", **kw),
    "kfac": lambda m, **kw: fl.optim.KFAC(m, **kw),
    "ekfac": lambda m, **kw: fl.optim.EKFAC(m, **kw),
    "tengrad": lambda m, **kw: fl.optim.TENGraD(m, **kw),
}


# ------------------------------------------------------------------ the earlier kernels
def _legacy_damped_inverse(matrix: Tensor, shift, dtype=None) -> Tensor:
    work_dtype = dtype or (torch.float64 if matrix.dtype == torch.float32 else matrix.dtype)
    work = matrix.to(work_dtype)
    work = (work + work.T) / 2
    shift = torch.as_tensor(shift, dtype=work_dtype, device=work.device)
    work = work + shift * torch.eye(len(work), dtype=work_dtype, device=work.device)
    chol, info = torch.linalg.cholesky_ex(work)
    ok = (info == 0) & torch.isfinite(work).all()
    inverse = torch.where(ok, torch.cholesky_inverse(chol), torch.nan)
    return inverse.to(matrix.dtype)


def _legacy_weighted_add(self, x, old_weight=1.0, new_weight=1.0, scale=1.0):
    if scale != 1:
        x = x * scale
    if self.value is None or old_weight == 0:
        self.value = x if new_weight == 1 else x.mul_(new_weight)
    else:
        if old_weight != 1:
            self.value.mul_(old_weight)
        if new_weight == 1:
            self.value.add_(x)
        else:
            self.value.add_(x, alpha=new_weight)
    self.mass = old_weight * self.mass + new_weight


def _legacy_sums_add(self, A, G, old_weight=1.0, new_weight=1.0, normaliser=1.0):
    a, g = blocks_factors._factor_rows(A, G, self.approx)
    aa, gg = a.T @ a, g.T @ g
    count = a.shape[0]
    if self.per_batch:
        aa, gg, count = aa / count, gg / normaliser, 1
    self.aa.add(aa, old_weight, new_weight)
    self.gg.add(gg, old_weight, new_weight)
    self.count = (0.0 if old_weight == 0 else old_weight * self.count) + new_weight * count


_NEW_FACTORS = blocks_factors.KroneckerSums.factors


def _legacy_sums_factors(self, normaliser=None, all_reduce=lambda t: t, shared=False):
    return _NEW_FACTORS(self, normaliser, all_reduce, shared=False)


def _legacy_kfe_squares(A, G, u_gamma, u_omega):
    A_rot, G_rot = A @ u_omega, G @ u_gamma
    if A.shape[1] == 1:
        return torch.einsum("rnd,ne->de", G_rot[:, :, 0] ** 2, A_rot[:, 0] ** 2)
    s = A.new_zeros(u_gamma.shape[0], u_omega.shape[0])
    row = G.shape[0] * u_gamma.shape[0] * u_omega.shape[0]
    for chunk in fl.linalg.sample_chunks(A.shape[0], row):
        rotated = fl.linalg.outer_rows(G_rot[:, chunk], A_rot[chunk])
        s += (rotated**2).sum(dim=(0, 1))
    return s


def _legacy_gram_factor(self, damping):
    cached = self.__dict__.get("_cholesky")
    if cached is not None and cached[0] == damping:
        return cached[1]
    k = self.gram
    work = k.double() if k.dtype != torch.float64 else k
    system = work + self.normaliser * damping * torch.eye(
        len(work), dtype=work.dtype, device=work.device
    )
    chol, info = torch.linalg.cholesky_ex(system)
    chol = torch.where(info == 0, chol, torch.nan)
    self._cholesky = (damping, chol)
    return chol


def _legacy_mirror(self, name, held, changed=None):
    state = self.layer_state[name]
    for key in [k for k in state if k.startswith(optim_kfac.BUILDER)]:
        del state[key]
    mirror = {
        k: v.clone() for k, v in held.state_dict().items() if k not in optim_kfac._NOT_MIRRORED
    }
    state.update({optim_kfac.BUILDER + k: v for k, v in mirror.items()})
    self._mirrors[name] = mirror


#: (owner, attribute, earlier version)
LEGACY = [
    (blocks_kfac, "damped_inverse", _legacy_damped_inverse),
    (blocks_base.WeightedSum, "add", _legacy_weighted_add),
    (blocks_factors.KroneckerSums, "add", _legacy_sums_add),
    (blocks_factors.KroneckerSums, "factors", _legacy_sums_factors),
    (blocks_ekfac, "kfe_squares", _legacy_kfe_squares),
    (blocks_woodbury.WoodburyBlock, "_gram_factor", _legacy_gram_factor),
    (optim_kfac.KFAC, "_mirror", _legacy_mirror),
]


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """``"new"``: the library as it is; ``"old"``: the earlier kernels patched in."""
    if name == "new":
        yield
        return
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in LEGACY]
    for owner, attr, legacy in LEGACY:
        setattr(owner, attr, legacy)
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


# ------------------------------------------------------------------------ the runs
def _setup(model_name: str, opt_name: str, dtype: torch.dtype, factor_dtype):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(dtype)
    x = torch.randn(128, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, 10, (128,))
    kwargs = {"lr": 1e-3, "damping": 1e-2, "momentum": 0.9}
    if opt_name != "tengrad" and factor_dtype is not None:
        kwargs["eigen_dtype"] = factor_dtype
    opt = OPTIMIZERS[opt_name](model, **kwargs)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return model, step


def parameter_change(
    model_name: str, opt_name: str, dtype: torch.dtype, kernels: str, steps: int, factor_dtype
) -> Tensor:
    """The parameters' total change over ``steps`` steps from the seeded start."""
    model, step = _setup(model_name, opt_name, dtype, factor_dtype)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    with variant(kernels):
        for _ in range(steps):
            step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach() - start


def relative_difference(
    model_name: str, opt_name: str, dtype, steps: int, factor_dtype, baseline: str
) -> float:
    old = parameter_change(model_name, opt_name, dtype, _kernels(baseline), steps, None)
    new = parameter_change(model_name, opt_name, dtype, "new", steps, factor_dtype)
    return float((new - old).norm() / old.norm())


def _kernels(baseline: str) -> str:
    """The kernels of the baseline: the earlier ones, or today's with float64 factorisations."""
    return "old" if baseline == "legacy" else "new"


def time_pair(model_name: str, opt_name: str, args: argparse.Namespace) -> dict:
    factor_dtype = getattr(torch, args.factor_dtype) if args.factor_dtype else None
    steps = {
        "old": _setup(model_name, opt_name, torch.float32, None)[1],
        "new": _setup(model_name, opt_name, torch.float32, factor_dtype)[1],
    }
    kernels = {"old": _kernels(args.baseline), "new": "new"}
    for which, step in steps.items():  # warm-up: one inverse/eigen update each
        with variant(kernels[which]):
            for _ in range(args.warmup):
                step()
    ratios, blocks = [], {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            with variant(kernels[which]):
                start = time.perf_counter()
                for _ in range(args.block):
                    steps[which]()
                blocks[which].append((time.perf_counter() - start) / args.block)
        ratios.append(blocks["new"][-1] / blocks["old"][-1])
    return {
        "old_ms": 1e3 * statistics.median(blocks["old"]),
        "new_ms": 1e3 * statistics.median(blocks["new"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_rounds": " ".join(f"{q:.3f}" for q in ratios),
    }


def kernel_rows(args: argparse.Namespace) -> list[dict]:
    """The two kernels alone, old and new alternated call by call (float32 inputs).

    ``damped_inverse`` of a ``D×D`` factor (float64 work) and one running-average update of
    the factor sums from ``M`` rows (``KroneckerSums.add`` with weights ``(0.95, 0.05)``): the
    sizes of the MLP's and 3C1F's largest factors.
    """
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in (785, 3137):
        a = torch.randn(2 * size, size, generator=generator)
        factor = a.T @ a / (2 * size)

        def run(which, factor=factor):
            with variant(which):
                return blocks_kfac.damped_inverse(factor, 1e-2)

        rows.append(_alternate(f"damped_inverse D={size}", run, args.kernel_repeats))
    for m, size in ((128, 785), (128, 3137), (6272, 577)):
        A = torch.randn(m, 1, size, generator=generator)
        G = torch.randn(1, m, 1, 64, generator=generator)
        sums = {w: blocks_factors.KroneckerSums("expand", per_batch=True) for w in ("old", "new")}
        for which, held in sums.items():
            with variant(which):
                held.add(A, G, 0.0, 1.0, normaliser=float(m))

        def run(which, A=A, G=G, m=m, sums=sums):
            with variant(which):
                sums[which].add(A, G, 0.95, 0.05, normaliser=float(m))
                return sums[which].factors(shared=True)

        rows.append(_alternate(f"factor update M={m} D={size}", run, args.kernel_repeats))
    return rows


def _alternate(label: str, run: Callable[[str], object], repeats: int) -> dict:
    """Median ``new ÷ old`` of ``repeats`` pairs of calls, alternating which goes first."""
    ratios, times = [], {"old": [], "new": []}
    out = {}
    for r in range(repeats + 1):
        pair = {}
        for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            out[which] = run(which)
            pair[which] = time.perf_counter() - start
        if r:  # the first pair warms up
            ratios.append(pair["new"] / pair["old"])
            for which in pair:
                times[which].append(pair[which])
    old, new = out["old"], out["new"]
    old, new = (old, new) if isinstance(old, tuple) else ((old,), (new,))
    difference = max(float((n - o).norm() / o.norm()) for o, n in zip(old, new, strict=True))
    return {
        "kernel": label,
        "old_ms": 1e3 * statistics.median(times["old"]),
        "new_ms": 1e3 * statistics.median(times["new"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rel_diff": difference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=10, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--check-steps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--factor-dtype", choices=["float32", "float64"], default=None)
    parser.add_argument(
        "--baseline",
        choices=["legacy", "float64"],
        default="legacy",
        help="old = the earlier kernels, or today's with float64 factorisations",
    )
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument(
        "--kernels", action="store_true", help="time the kernels alone (not the steps)"
    )
    parser.add_argument("--kernel-repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    factor_dtype = getattr(torch, args.factor_dtype) if args.factor_dtype else None
    if args.kernels:
        rows = kernel_rows(args)
        print(format_table(rows))
        RESULTS.mkdir(exist_ok=True)
        save_table(rows, RESULTS / "bench_kernels_alone", meta={"load_average": os.getloadavg()})
        return
    rows = []
    for model_name in args.models:
        for opt_name in args.optimizers:
            row = {"model": model_name, "optimizer": opt_name}
            for label, dtype in (("rel_diff_f32", torch.float32), ("rel_diff_f64", torch.float64)):
                fdt = factor_dtype if dtype == torch.float32 else None
                row[label] = relative_difference(
                    model_name, opt_name, dtype, args.check_steps, fdt, args.baseline
                )
            row.update(time_pair(model_name, opt_name, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(format_table(rows))
    RESULTS.mkdir(exist_ok=True)
    meta = {"threads": args.threads, "rounds": args.rounds, "block": args.block,
            "factor_dtype": args.factor_dtype, "baseline": args.baseline,
            "torch": torch.__version__, "load_average": list(os.getloadavg())}  # fmt: skip
    name = "bench_kernels" + (f"_{args.tag}" if args.tag else "")
    save_table(rows, RESULTS / name, meta=meta)


if __name__ == "__main__":
    main()
