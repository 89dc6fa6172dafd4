#!/usr/bin/env bash
# The checks that need a CUDA device, as one prepared script for a lent GPU (the device tool).
#
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else /tmp/unison-gpu-check
#
# 1. the CUDA-marked tests (compression math on CUDA; torchrun over NCCL, one process per device,
#    sync / sync(compress=powersgd(2)) / diloco(compress=int8) against threads on CPU; more
#    processes than devices refused by name) and stacked replicas on CUDA against the CPU;
# 2. the torchrun tests on gloo with the devices hidden (the 2-process path a 1-GPU node cannot
#    run over NCCL);
# 3. bench/stacked.py --device cuda: stacked replicas against one plain replica on the GPU.
# Uses the machine's own python3 and torch (nothing can be fetched there); unison's one
# dependency that image lacks, tomli-w, travels as a wheel: on the machine that calls the device
#   pip download --no-deps --only-binary=:all: -d .whl tomli_w      (and carry .whl)
# Whole run: about 3-5 minutes on an H200. Everything is logged to OUT_DIR/gpu_check.log.
set -u
out=${1:-${OUT:-/tmp/unison-gpu-check}}
mkdir -p "$out"
log="$out/gpu_check.log"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$py" -c "import tomli_w" 2>/dev/null && ls .whl/tomli_w-*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --target /tmp/unison-site .whl/tomli_w-*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/unison-site"
fi
status=0
step() {  # step NAME COMMAND...: run, log, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$log"
    local started=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - started)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } 2>&1 | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())" 2>&1 | tee -a "$log"
pytest=("$py" -m pytest -q -p no:cacheprovider -o addopts=-ra --timeout 400)
step cuda-tests "${pytest[@]}" tests/test_cuda.py "tests/test_stacked.py::test_stacked_on_cuda_equals_stacked_on_cpu"
step torchrun-gloo env CUDA_VISIBLE_DEVICES= "${pytest[@]}" tests/test_torchrun.py
step stacked-bench "$py" bench/stacked.py --device cuda
exit $status
