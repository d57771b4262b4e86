#!/usr/bin/env bash
# On a CUDA machine: the device-parametrised tests on CUDA, then bench_optim.py on the GPU for
# the three models at batch 128 and 512. Results under benchmarks/results/ (bench_optim_cuda.*,
# gpu_check_tests.txt). Within 8 minutes on one recent GPU; CI never runs it.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the project's venv
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
results=benchmarks/results
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu_check_device.txt"
# every test that takes the `device` fixture runs on cpu and cuda
timeout 240 python -m pytest -q -k "device" tests/ 2>&1 | tee "$results/gpu_check_tests.txt" | tail -3
timeout 300 python benchmarks/bench_optim.py --device cuda --models mlp 3c1f resnet \
    --batch-sizes 128 512 --rounds 3 --no-profile
