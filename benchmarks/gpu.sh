#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, as run on a lent H100/H200 machine (offline, image
# with Python 3.12 + torch 2.11.0+cu130 and no vLLM/TerraTorch). TerraTorch 1.2.10 and the
# dependencies the image lacks travel as one archive of their installed files, `.gpu/site312.tar.xz`,
# built by `bash benchmarks/gpu_pack.sh`
# (`pip install --no-deps --target` of py3.12 wheels, then `tar | xz -9`: 77 MB of wheels become
# 48 MiB, under the 64 MiB a call may carry). Usage there: `bash benchmarks/gpu.sh OUTDIR`.
# Each run is bounded so that one slow compile cannot take the others' results with it.
set -u
out=${1:?output folder}
mkdir -p /tmp/site "$out"
tar -xJf .gpu/site312.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
run() {  # seconds, then offline.py arguments
    local limit=$1
    shift
    timeout "$limit" python3 benchmarks/offline.py --output "$out" --work-dir /tmp/models "$@" 2>&1 |
        grep -v -E "Warning|warnings.warn|USDT|profiler_st"
}
# Launch-bound: the tiny model, where CUDA graphs should matter most.
run 140 --model tiny --num-images 256 --batch-size 8 --repeats 7 --profile \
    --paths raw,adapter,adapter-compiled=default,adapter-compiled=reduce-overhead
# Compute-bound: Prithvi-EO-2.0-300M + UperNet at 512².
run 210 --model prithvi300 --image-size 512 --dtype bfloat16 --num-images 64 --batch-size 8 --repeats 5 \
    --profile --flops --paths raw,adapter,adapter-compiled=reduce-overhead
run 180 --model prithvi300 --image-size 512 --dtype float32 --num-images 64 --batch-size 8 --repeats 5 \
    --profile --paths raw,adapter,adapter-compiled=reduce-overhead
ls -la "$out"
