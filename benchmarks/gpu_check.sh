#!/bin/sh
# Everything a session with a GPU checks, in one run (about 10 minutes on an H100/H200):
# the GPU-marked tests, then benchmarks/gpu.py appending its tables to RESULTS.md.
#   sh benchmarks/gpu_check.sh [results.md]
set -e
export PYTHONUNBUFFERED=1
python -m pytest -q -m gpu tests/test_gpu_path.py tests/test_runtime.py tests/test_profile.py
python benchmarks/gpu.py --write "${1:-benchmarks/RESULTS.md}"
