"""Time per optimizer step, as a ratio to SGD's step on the same model and batch.

A step is ``zero_grad; forward; loss; backward; step`` (for ASDL: its ``forward_and_backward``
plus an SGD step). Every optimizer runs the same synthetic batch; after ``--warmup`` steps the
mean (``step_ms``, amortised) and the median of ``--steps`` steps are taken, and all ratios (of
means) come from one run: ``--rounds`` times every optimizer in turn, each ratio taken within a
round, reported as the median over rounds with its range (``ratio_min``, ``ratio_max``).
KFAC/EKFAC update factors every step and decompose (or invert) them every 10 steps, as in their
defaults and ASDL's; FNGD is timed after its first epoch (``steps_per_epoch`` = the warm-up),
when it reuses its weights. ``kfac-factored`` is fisherlab's KFAC with factored Tikhonov
damping, the method ASDL's KFAC implements; ``ratio_to_asdl`` compares it with ASDL's KFAC, and
TENGraD with ASDL's SMW natural gradient (the same ``(F_b + λI)⁻¹g``).

Models: ``mlp`` 784-512-256-10 and ``3c1f`` (3 conv + 1 FC) on 28×28 inputs; ``resnet``, a
ResNet-style net (stem, three residual stages of 16/32/64 channels with BatchNorm, pooling, FC)
on 3×32×32 inputs. ``host_syncs`` counts, in one step, the calls that make the host wait for
the device (``Tensor.__bool__``, ``item``, ``tolist``, ``__float__``, ``__int__``): on a CPU
they cost nothing, on a GPU each one stalls the queue. Peer: ASDL (``asdfghjkl``, the
``bench`` extra) where installed and where it takes the model.

    python benchmarks/bench_optim.py --threads 1                    # CPU, MLP and 3C1F
    python benchmarks/bench_optim.py --threads 1 --models resnet --batch-sizes 128 512
    python benchmarks/bench_optim.py --device cuda --models mlp 3c1f resnet --batch-sizes 128 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import fisherlab as fl
from fisherlab.report import format_table, save_table
from fisherlab.syncs import counting_syncs

RESULTS = Path(__file__).parent / "results"
FISHERLAB = ("kfac", "kfac-factored", "ekfac", "ekfac-ra", "tengrad", "skfac", "fngd")
#: fisherlab optimizer → ASDL's implementation of the same method.
SAME_METHOD = {"kfac-factored": "asdl-kfac", "tengrad": "asdl-smw"}


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
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Residual(16, 16, 1), _Residual(16, 32, 2), _Residual(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


MODELS = {
    "mlp": (mlp, (1, 28, 28)),
    "3c1f": (three_conv_one_fc, (1, 28, 28)),
    "resnet": (resnet, (3, 32, 32)),
}


def _fisherlab(name: str, warmup: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
    kwargs = {"lr": 1e-3, "damping": 1e-2, "momentum": 0.9, "unsupported": "sgd"}
    if name == "fngd":
        return lambda m: fl.optim.FNGD(m, steps_per_epoch=warmup, **kwargs)
    if name == "kfac-factored":
        return lambda m: fl.optim.KFAC(m, damping_mode="factored", **kwargs)
    return lambda m: fl.optim.OPTIMIZERS[name](m, **kwargs)


def time_steps(
    step: Callable[[], None], warmup: int, steps: int, device: str
) -> tuple[float, float, int]:
    """Mean and median seconds of ``steps`` calls after ``warmup`` calls; host syncs in one.

    The mean is the amortised cost (eigen-decompositions every 10 steps included when
    ``steps`` is a multiple of 10); the median is a typical step without them.
    """
    for _ in range(warmup):
        step()
    with counting_syncs() as syncs:
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
    return statistics.mean(times), statistics.median(times), syncs[0]


def bench_model(model_name: str, batch_size: int, args: argparse.Namespace) -> list[dict]:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(batch_size, *shape, device=args.device)
    y = torch.randint(0, 10, (batch_size,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()

    def plain(make):
        torch.manual_seed(0)
        model = build().to(args.device)
        with _quiet():
            opt = make(model)

            def step():
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()

            result = time_steps(step, args.warmup, args.steps, args.device)
        if hasattr(opt, "close"):
            opt.close()
        return result

    timings = {
        "sgd": plain(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)),
        "adam": plain(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
    }
    for name in FISHERLAB:
        timings[name] = plain(_fisherlab(name, args.warmup))
    timings.update(asdl_timings(build, x, y, loss_fn, batch_size, args))
    rows = []
    for name, (seconds, median, syncs) in timings.items():
        peer = timings.get(SAME_METHOD.get(name, ""))
        rows.append(
            {
                "model": model_name,
                "batch": batch_size,
                "optimizer": name,
                "step_ms": 1e3 * seconds,
                "median_ms": 1e3 * median,
                "ratio_to_sgd": seconds / timings["sgd"][0],
                "ratio_to_asdl": seconds / peer[0] if peer else None,
                "host_syncs": syncs,
            }
        )
    return rows


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per optimizer: medians over the rounds, and the range of its ratio to SGD.

    Each round times every optimizer once, so a ratio is taken within a round; the median
    over rounds is robust to a round in which the machine was busy.
    """
    out = []
    for rows in zip(*rounds):
        ratios = [r["ratio_to_sgd"] for r in rows]
        row = dict(rows[0])
        for key in ("step_ms", "median_ms", "ratio_to_sgd"):
            row[key] = statistics.median(r[key] for r in rows)
        peers = [r["ratio_to_asdl"] for r in rows if r["ratio_to_asdl"] is not None]
        row["ratio_to_asdl"] = statistics.median(peers) if peers else None
        row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
        row["ratio_rounds"] = " ".join(f"{r:.3g}" for r in ratios)
        out.append(row)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "plain gradient step" for BatchNorm, once per model
        yield


def asdl_timings(build, x, y, loss_fn, batch_size, args) -> dict[str, tuple[float, float, int]]:
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
                data_size=batch_size, damping=1e-2, preconditioner_upd_interval=10
            ),
        ),
        "asdl-smw": lambda m: SmwEmpNaturalGradientMaker(
            m, SmwEmpNaturalGradientConfig(data_size=batch_size, damping=1e-2)
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

        try:
            with _quiet():
                out[name] = time_steps(step, args.warmup, args.steps, args.device)
        except Exception as err:  # e.g. a layer type ASDL does not take
            print(f"{name} skipped: {type(err).__name__}: {err}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["mlp", "3c1f"], choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every optimizer is timed, in turn (medians and the range of the ratios "
        "over rounds: a shared machine's speed drifts between optimizers)",
    )
    parser.add_argument("--out", default=None, help="results name (default bench_optim_DEVICE)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [
        row
        for m in args.models
        for b in args.batch_sizes
        for row in combine_rounds([bench_model(m, b, args) for _ in range(args.rounds)])
    ]
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
    }
    print(json.dumps(machine))
    print(format_table(rows))
    name = args.out or f"bench_optim_{'cuda' if args.device == 'cuda' else 'cpu'}"
    paths = save_table(rows, RESULTS / name, machine)
    print("saved " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
