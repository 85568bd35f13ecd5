#!/usr/bin/env bash
# The CUDA checks, in one script for a lent GPU machine (run from the repository root):
# the GPU tests (extraction on cuda:0 vs CPU, two processes on one GPU, MIL training on
# the GPU), then extraction throughput (ViT-B/16 and ViT-L/16 in bf16, from zarr stores
# vs the model alone) and training throughput. Each step has its own time limit, so one
# failure still leaves the others' numbers. Logs go to OUT_DIR (default cuda-results/).
#
#   bash benchmarks/cuda.sh [OUT_DIR]        (STEPS="extract tests train" by default)
set -u
out=${1:-cuda-results}
py=${PYTHON:-python3}
workers=${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 2 ))}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    [[ " ${STEPS:-extract tests train} " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"; } 2>&1 | tee "$out/gpu.log"
step extract 200 $py benchmarks/extract.py --no-cpu --slides 12 --workers "$workers" \
    --gpu-batch-size "${BATCH:-256}" --gpu-tiles "${TILES:-20000}" --repeats 2
step tests 130 $py -m pytest -q -p no:cacheprovider tests/features/test_cuda.py \
    tests/features/test_extract.py tests/mil
step train 100 $py benchmarks/train.py --device cuda --bags 100 --epochs 3
