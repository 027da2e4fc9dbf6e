#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine, after scripts/gpu_kit.sh packed .gpu/ here:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# 1. installs .gpu/wheels into /tmp/site (nothing can be fetched there) and records the versions;
# 2. the CUDA tests (pytest -m gpu: nf4 + bf16 SFT then DPO on a tiny model); stops here if they fail;
# 3. scripts/bench_gpu.py on the Qwen2.5-0.5B, Llama-3.1-8B and Llama-3.2-1B shapes in what is left
#    of BUDGET_S seconds (each run at most RUN_S): what finished is reported, the rest says why not.
# Everything worth reading lands in $OUT (the device tool brings it back): env.txt, pytest.log,
# bench.log, bench_gpu.md (the report, to append to docs/benchmarks.md) and runs.tar.gz (each run's
# log and metrics.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
BUDGET_S=${BUDGET_S:-540}  # the whole script; leave the device call's timeout_s some room above it
RUN_S=${RUN_S:-200}
SHAPES=${SHAPES:-qwen2.5-0.5b,llama-3.1-8b,llama-3.2-1b}
STEPS=${STEPS:-5}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SHAPES=tiny: a rehearsal of this script on a CPU machine
start=$SECONDS
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || { echo "installing .gpu/wheels failed" >&2; exit 1; }
# PYTHONSAFEPATH: `python -m rlhf_cli` run from the repository root must import the installed
# package (which maps configs/ to rlhf_cli.configs), not the source folder beside it
export PYTHONPATH=/tmp/site:$PWD/scripts PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 WANDB_MODE=disabled
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import platform, torch; print('python', platform.python_version(), '| torch',
torch.__version__, '| cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|bitsandbytes|hydra-core|omegaconf|rlhf-cli) '
    python3 -c "import bitsandbytes, rlhf_cli; print('imports ok:', rlhf_cli.__file__)"
} 2>&1 | tee "$OUT/env.txt"

timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "the CUDA tests failed (pytest.log); the benchmark was not run" >&2
    exit 1
fi

left=$((BUDGET_S - (SECONDS - start)))
echo "benchmark: $left s left of $BUDGET_S"
rm -rf /tmp/bench-runs  # a rerun on a warm machine: the runs of the last call are finished runs
python3 scripts/bench_gpu.py --shapes "$SHAPES" --steps "$STEPS" --device "$DEVICE" --tokenizer .gpu/tokenizer \
    --budget-s "$left" --run-s "$RUN_S" --workdir /tmp/bench-runs --append "$OUT/bench_gpu.md" \
    2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
tar czf "$OUT/runs.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='tokenizer*' -C /tmp bench-runs 2>/dev/null
echo "gpu_check: $((SECONDS - start)) s"
exit "$status"
