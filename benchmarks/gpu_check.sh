#!/bin/sh
# Everything a session with a GPU checks, in one run of at most 9.5 minutes on an H100/H200:
#   sh benchmarks/gpu_check.sh [out-dir]
# 1. what the machine has (GPU, driver, torch, cuda-python, diffusers);
# 2. a smoke check of SM partitions (4 groups, a matrix product on each);
# 3. the GPU-marked tests (about 30 s on an H200);
# 4. benchmarks/gpu.py, writing its tables to out-dir/gpu_tables.md row by row (about 4 min).
# Each part runs under its own time limit and a failing part does not stop the next, so
# one run returns every result it could get. Everything goes to out-dir (default: $OUT if
# set, else benchmarks/gpu_check): gpu_check.log, gpu_tables.md, and one exit status per
# part in status.txt. Copy the tables into benchmarks/RESULTS.md afterwards.
out="${1:-${OUT:-benchmarks/gpu_check}}"
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
# asyncfx from this checkout, whether or not it is installed
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

ENVIRONMENT='
import importlib.metadata as metadata, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("cuda-bindings", "cuda-python", "diffusers", "networkx", "numpy"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
props = torch.cuda.get_device_properties(0)
print(props.name, props.multi_processor_count, "SMs", props.total_memory // 2**30, "GiB")'

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, log its status
    name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@"
    status=$?
    echo "=== $name: exit $status after $(( $(date +%s) - start )) s"
    echo "$name $status" >> "$out/status.txt"
}

{
    : > "$out/status.txt"
    part environment 30 sh -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
        $python -c '$ENVIRONMENT'"
    part sm-partitions 45 "$python" -c '
import torch
from asyncfx.runtime.green import sm_partitions
parts = sm_partitions(4)
x = torch.randn(2048, 2048, device="cuda")
outs = []
for p in parts:
    with torch.cuda.stream(p.stream):
        outs.append(x @ x)
for p in parts:
    p.stream.synchronize()
for y in outs:
    torch.testing.assert_close(y, x @ x)
print("4 partitions:", [p.sm_count for p in parts], "SMs; a product on each matches")'
    # each test under its own limit where pytest-timeout is installed, so that one that hangs
    # still leaves the others' results and every failure's traceback in the log
    per_test=$("$python" -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=60")
    # in one process (-o addopts=: the suite's own options spread it over every core with
    # pytest-xdist, which a GPU machine may lack; GPU tests share one device anyway)
    part gpu-tests "${TESTS_LIMIT_S:-120}" "$python" -m pytest -q -m gpu -p no:cacheprovider -o addopts= -rfE \
        --tb=short $per_test tests/test_gpu_path.py tests/test_runtime.py tests/test_profile.py
    part benchmark "${BENCHMARK_LIMIT_S:-360}" "$python" benchmarks/gpu.py --write "$out/gpu_tables.md"
} 2>&1 | tee "$out/gpu_check.log"
! grep -q -v ' 0$' "$out/status.txt"
