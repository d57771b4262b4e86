"""KFAC under ``torch.distributed``: eigen-decompositions shared out across ranks or repeated.

Two gloo processes (one thread each) train the MLP 784-512-256-10 on synthetic data, 64 samples
per rank, gradients averaged as DDP does. For KFAC (eigen damping) and KFAC with factored
damping, with the factors decomposed or inverted every step (``inv_update_freq=1``, the case
where it matters) and every 10 steps (the default), the script reports the mean step time on
rank 0 with ``spread_eigen=True`` (each layer's work on one rank, the results broadcast) and
``False`` (every rank does every layer), and the bytes each rank sends per step through
fisherlab's collectives (factor all-reduces, broadcasts), the gradients' all-reduce apart.

    python benchmarks/bench_distributed.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fisherlab as fl
from fisherlab.report import format_table, save_table

RESULTS = Path(__file__).parent / "results"
WORLD, BATCH, WARMUP, STEPS = 2, 64, 5, 20
CASES = [
    (mode, freq, spread)
    for mode in ("eigen", "factored")
    for freq in (1, 10)
    for spread in (True, False)
]


def _counting(sent: list[int]):
    """Wrap the collectives fisherlab calls to count the bytes this rank contributes."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather")}

    def wrap(name):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            sent[0] += tensor.numel() * tensor.element_size()
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, wrap(name))
    return originals


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows = []
    for mode, freq, spread in CASES:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )  # fmt: skip
        opt = fl.optim.KFAC(
            model, lr=1e-3, damping=1e-2, inv_update_freq=freq, damping_mode=mode,
            spread_eigen=spread,
        )  # fmt: skip
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        times, sent = [], [0]
        for step in range(WARMUP + STEPS):
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for p in model.parameters():  # what DDP does
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            originals = _counting(sent) if step >= WARMUP else None
            opt.step()
            if originals:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
            dist.barrier()
            if step >= WARMUP:
                times.append(time.perf_counter() - start)
        opt.close()
        rows.append(
            {
                "damping_mode": mode,
                "inv_update_freq": freq,
                "spread_eigen": spread,
                "step_ms": 1e3 * statistics.mean(times),
                "kib_sent_per_step": sent[0] / STEPS / 1024,
            }
        )
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    machine = {
        "processor": platform.processor() or platform.machine(),
        "processes": WORLD,
        "threads_per_process": 1,
        "torch": torch.__version__,
        "batch_per_rank": BATCH,
    }
    print(json.dumps(machine))
    print(format_table(rows))
    paths = save_table(rows, RESULTS / "bench_distributed", machine)
    print("saved " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
