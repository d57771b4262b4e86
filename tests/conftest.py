import pytest
import torch
from cases import BATCH_SIZES, CASE_IDS, CASES


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
