import os
import sys
from pathlib import Path

import pytest
import torch
from cases import BATCH_SIZES, CASE_IDS, CASES
from helpers import DEVICES

# the benchmarks' tools (benchmarks/syncs.py, the host-sync counter) for the tests that use them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: -n 2 on 2 cores with two threads each
    # oversubscribes the cores, and spinning OpenMP threads slow small ops down tenfold
    torch.set_num_threads(1)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param


@pytest.fixture(params=BATCH_SIZES, ids=[f"N{n}" for n in BATCH_SIZES])
def batch_size(request):
    return request.param


@pytest.fixture(params=["true", "mc", "empirical"])
def fisher_type(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device present (CPU always, CUDA when available)."""
    return torch.device(request.param)
