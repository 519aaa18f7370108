#!/usr/bin/env bash
# #19: the one script a lent GPU machine runs, after the kit's archives are unpacked
# (`bash benchmarks/gpu/kit.sh unpack ARCHIVE /tmp/kit`, one archive per call, back to back).
#
#   bash benchmarks/gpu/run.sh OUT                 # GPU: vLLM 0.26 + TerraTorch from $KIT (default /tmp/kit)
#   bash benchmarks/gpu/run.sh OUT --device cpu    # dry run here (CI): this environment, tiny sizes
#
# Steps, most valuable first, each with its own time limit and all inside RUN_BUDGET_S (default
# 540 s: a call may run 600 s), so one slow step cannot take the others' results with it; a step
# with too little budget left is recorded as skipped:
#   engine   (a)+(b) LLM(...) on the tiny model, eager and without --enforce-eager, vs a plain forward
#   conv     (f) which kernel a bf16 convolution takes, and why (conv_bf16.py)
#   bf16-b8  (c)+(d) Prithvi-300M + UperNet at 512², bf16: raw, ours, compiled; vLLM's memory
#            profiling figures are read from its start-up log
#   online   (e) `vllm serve` with the mission's line, benchmarks/online.py at concurrency 1, 16, 64
#   fp32-b8, bf16-b32   the remaining offline configurations, if time is left
# OUT gets at most 8 files (what a call brings back): summary.json (steps, machine, the log lines
# about memory, graphs and eager mode, the tail of each failed step's log), one JSON per step, and
# logs.tar.xz with every log.
set -u
out=${1:?usage: run.sh OUT [--device cpu]}
device=cuda
[[ ${2:-} == --device ]] && device=${3:?--device cuda|cpu}
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here" || exit 1
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$out" "$work/logs" "$work/results"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [[ $device == cuda ]]; then
    export PYTHONPATH=${KIT:-/tmp/kit}:$here${PYTHONPATH:+:$PYTHONPATH}
    tiny=(--num-images 64 --batch-size 8 --repeats 5)
    big=(--model prithvi300 --image-size 512 --num-images 64 --repeats 3)
    online=(--levels "1,16,64" --requests 128 --scene-size 512 --time-limit 40)
    big_paths=raw,ours,compiled=reduce-overhead rest_paths=$big_paths
    slow=1
else
    export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}
    tiny=(--num-images 8 --batch-size 4 --repeats 1)
    big=(--model tiny --image-size 64 --num-images 8 --repeats 1)  # the same steps, sized for a CPU
    online=(--levels "1,2" --requests 4 --scene-size 64 --time-limit 30)
    # A cold compile takes minutes on a CPU, and each engine start ~30 s: the dry run checks the
    # commands, so the last two configurations time only the raw forward.
    big_paths=raw,ours rest_paths=raw
    slow=${RUN_STEP_SCALE:-4}  # step limits are the GPU's; a busy 2-core CPU takes longer
fi
budget=${RUN_BUDGET_S:-540}
started=$SECONDS
printf 'step\trc\tseconds\n' > "$work/steps.tsv"

step() {  # NAME LIMIT_S COMMAND...: run it under min(LIMIT, budget left), log, record rc and time
    local name=$1 limit=$2 left
    shift 2
    limit=$((limit * slow))
    left=$((budget - (SECONDS - started)))
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        printf '%s\tskipped\t0\n' "$name" >> "$work/steps.tsv"
        return
    fi
    local t0=$SECONDS rc
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" > "$work/logs/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$work/steps.tsv"
    tail -n 3 "$work/logs/$name.log"
}
offline=("$python" benchmarks/offline.py --work-dir "$work/models" --output "$work/results")  # (timeout runs no functions)

step engine 150 "${offline[@]}" --model tiny "${tiny[@]}" --dtype float32 --paths raw,ours,graphs
step conv 60 "$python" benchmarks/gpu/conv_bf16.py --output "$work/results"
step bf16-b8 210 "${offline[@]}" "${big[@]}" --dtype bfloat16 --batch-size 8 --flops --paths "$big_paths"
models=("$work/models/${big[1]}"-*)  # the folder bf16-b8 built
big_model=${models[0]}
step online 150 "$python" benchmarks/online.py --model "$big_model" --work-dir "$work/online" --output "$work/results" "${online[@]}"
cp "$work/online/server.log" "$work/logs/online-server.log" 2>/dev/null
step fp32-b8 150 "${offline[@]}" "${big[@]}" --dtype float32 --batch-size 8 --paths "$rest_paths"
step bf16-b32 150 "${offline[@]}" "${big[@]}" --dtype bfloat16 --batch-size 32 --paths "$rest_paths"

"$python" benchmarks/gpu/summarize.py "$work" "$out" --device "$device"
ls -la "$out"
rm -rf "$work"
