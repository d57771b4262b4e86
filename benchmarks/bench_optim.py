"""Time per optimizer step, as a ratio to SGD's step on the same model and batch.

A step is ``zero_grad; forward; loss; backward; step`` (for ASDL: its ``forward_and_backward``
plus an SGD step). Every optimizer runs the same synthetic batch; after ``--warmup`` steps the
median of ``--steps`` steps is taken, and all ratios come from one run. KFAC/EKFAC are timed
amortised (factors every step, eigen-decompositions every 10 steps, as in their defaults);
FNGD is timed after its first epoch (``steps_per_epoch`` = the warm-up), when it reuses its
weights. Models: MLP 784-512-256-10 and a 3-conv-1-FC net on 28×28 inputs, batch 128.
Peer: ASDL (``asdfghjkl``) KFAC and its SMW empirical natural gradient, where installed.

    python benchmarks/bench_optim.py            # CPU
    python benchmarks/bench_optim.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import fisherlab as fl
from fisherlab.report import format_table, save_table

RESULTS = Path(__file__).parent / "results"


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def three_conv_one_fc() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )  # fmt: skip


def _fisherlab(name: str, warmup: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
    kwargs = {"lr": 1e-3, "damping": 1e-2, "momentum": 0.9}
    if name == "fngd":
        return lambda m: fl.optim.FNGD(m, steps_per_epoch=warmup, **kwargs)
    return lambda m: fl.optim.OPTIMIZERS[name](m, **kwargs)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: str) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(model_name: str, args: argparse.Namespace) -> list[dict]:
    build = {"mlp": mlp, "3c1f": three_conv_one_fc}[model_name]
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch_size,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    rows = []

    def plain(make):
        torch.manual_seed(0)
        model = build().to(args.device)
        opt = make(model)

        def step():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        seconds = time_steps(step, args.warmup, args.steps, args.device)
        if hasattr(opt, "close"):
            opt.close()
        return seconds

    timings = {
        "sgd": plain(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)),
        "adam": plain(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
    }
    for name in ("kfac", "ekfac", "ekfac-ra", "tengrad", "skfac", "fngd"):
        timings[name] = plain(_fisherlab(name, args.warmup))
    timings.update(asdl_timings(build, x, y, loss_fn, args))
    for name, seconds in timings.items():
        rows.append(
            {
                "model": model_name,
                "optimizer": name,
                "step_ms": 1e3 * seconds,
                "ratio_to_sgd": seconds / timings["sgd"],
            }
        )
    return rows


def asdl_timings(build, x, y, loss_fn, args) -> dict[str, float]:
    """ASDL's KFAC and SMW empirical natural gradient, each followed by an SGD step."""
    try:
        from asdl import KfacGradientMaker, PreconditioningConfig
        from asdl.precondition.smw import SmwEmpNaturalGradientConfig, SmwEmpNaturalGradientMaker
    except Exception:  # not installed, or does not import beside this torch
        return {}
    makers = {
        "asdl-kfac": lambda m: KfacGradientMaker(
            m,
            PreconditioningConfig(
                data_size=args.batch_size, damping=1e-2, preconditioner_upd_interval=10
            ),
        ),
        "asdl-smw": lambda m: SmwEmpNaturalGradientMaker(
            m, SmwEmpNaturalGradientConfig(data_size=args.batch_size, damping=1e-2)
        ),
    }
    out = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        model = build().to(args.device)
        maker, sgd = make(model), torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step(model=model, maker=maker, sgd=sgd):
            sgd.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(loss_fn, dummy, y)
            maker.forward_and_backward()
            sgd.step()

        out[name] = time_steps(step, args.warmup, args.steps, args.device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["mlp", "3c1f"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for m in args.models for row in bench_model(m, args)]
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "batch_size": args.batch_size,
    }
    print(json.dumps(machine))
    print(format_table(rows))
    tag = "cuda" if args.device == "cuda" else "cpu"
    paths = save_table(rows, RESULTS / f"bench_optim_{tag}", machine)
    print("saved " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
