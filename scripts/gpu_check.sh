#!/usr/bin/env bash
# One-command check of the GPU paths, in a few minutes, on a machine with NVIDIA GPUs:
#   1. the Triton router-kernel tests, compiled and run natively (tests/test_router_kernel.py on cuda tensors);
#   2. a few bf16 stage-1 steps (ds_configs/zero2_bf16.json) with NCCL on every GPU, ep_size = number of GPUs
#      when > 1 (a random 8-layer Llama, h 512, upcycled with one new expert per GPU in every layer), then two
#      stage-2 steps;
#   3. the evaluate stage on the GPUs in bf16, split over the ranks;
#   4. the router kernel benchmark (benchmarks/router_kernel_gpu.py, routing only);
# then one summary table: check, result, seconds, key number. Exit status 0 when every check passed, 1 otherwise.
# The run is self-contained (synthetic corpus, tokenizer trained on it, random model): no network, no cache.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine, from the repository root
#   GPU_CHECK_DIR=/tmp/x bash scripts/gpu_check.sh   # keep the run directory and logs there
#
# Without a GPU it exits 2 with one line. GPU_CHECK_CPU=1 is a plumbing check of this script, not of the GPU
# paths: the same steps on CPU at tiny size (2 gloo processes with ep_size 2, fp32 ZeRO-2; the kernel tests in
# the Triton interpreter, a subset; the CPU MoE-layer benchmark at a tiny shape in place of the GPU one).
# tests/test_gpu_check.py runs it, so that this script cannot rot.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MASTER_ADDR=127.0.0.1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${GPU_CHECK_CPU:-0}" == 1 ]]; then
    MODE=cpu GPUS=2 DEVICE=cpu DS_CONFIG=ds_configs/zero2_fp32.json HIDDEN=32 LAYERS=2
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
    if [[ -z "$GPUS" || "$GPUS" == 0 ]]; then
        echo "gpu_check.sh: no NVIDIA GPU visible to torch (torch.cuda.is_available() is False); GPU_CHECK_CPU=1 runs a CPU plumbing check" >&2
        exit 2
    fi
    MODE=gpu DEVICE=cuda DS_CONFIG=ds_configs/zero2_bf16.json HIDDEN=512 LAYERS=8
fi

DIR=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$DIR/logs"
ROWS=()
FAILED=0

# check NAME KEY-COMMAND -- COMMAND...: run COMMAND (log in $DIR/logs/NAME.log), then KEY-COMMAND for the key number
check() {
    local name=$1 key=$2
    shift 3
    local start=$SECONDS result number
    echo "[gpu_check] $name: $*" >&2
    if "$@" >"$DIR/logs/$name.log" 2>&1; then
        result=ok
        number=$(eval "$key" 2>/dev/null | tail -n 1)
    else
        result=FAILED FAILED=1
        number="see $DIR/logs/$name.log"
        tail -n 20 "$DIR/logs/$name.log" >&2
    fi
    ROWS+=("$(printf '%-22s %-7s %6ds  %s' "$name" "$result" $((SECONDS - start)) "$number")")
}

passed() { grep -Eo '[0-9]+ passed' "$DIR/logs/$1.log" | tail -n 1; }

if [[ $MODE == gpu ]]; then
    check kernel_tests "passed kernel_tests" -- "$PY" -m pytest -q -n 0 -p no:cacheprovider -m triton_interpreter \
        tests/test_router_kernel.py
else
    check kernel_tests "passed kernel_tests" -- env TRITON_INTERPRET=1 "$PY" -m pytest -q -n 0 -p no:cacheprovider \
        -m triton_interpreter tests/test_router_kernel.py -k "ties or (kernel_matches and 5-2 and float32)"
fi

CONFIG=$("$PY" scripts/gpu_check.py prepare "$DIR" --device "$DEVICE" --ranks "$GPUS" --hidden "$HIDDEN" \
         --layers "$LAYERS" --ds-config "$DS_CONFIG") || { echo "gpu_check.sh: could not prepare the run in $DIR" >&2; exit 1; }
check prepare_round "echo analyze, allocate, upcycle" -- "$PY" -m pipeline.cli run "$CONFIG" --until upcycle
for stage in train_stage1 train_stage2 evaluate; do
    check "$stage" "$PY scripts/gpu_check.py key $DIR $stage" -- \
        "$PY" -m pipeline.cluster stage "$stage" --config "$CONFIG" --round g1 --processes-per-node "$GPUS"
done

if [[ $MODE == gpu ]]; then
    check router_benchmark "grep -E '^ *[0-9]+ +[0-9]+ ' $DIR/logs/router_benchmark.log | tail -n 1 | tr -s ' '" -- \
        "$PY" benchmarks/router_kernel_gpu.py --experts 2 6 16 --tokens 16384 65536 --skip-block
else
    check moe_cpu_benchmark "grep -E '^smollm2' $DIR/logs/moe_cpu_benchmark.log | tail -n 1 | tr -s ' '" -- \
        "$PY" benchmarks/moe_block_cpu.py --shapes smollm2 --repeats 1 --threads 1
fi

echo
echo "gpu_check ($MODE, $GPUS $( [[ $MODE == gpu ]] && echo GPU\(s\) || echo processes)); logs and run in $DIR"
printf '%-22s %-7s %7s  %s\n' check result time "key number"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
