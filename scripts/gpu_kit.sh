#!/usr/bin/env bash
# Packs .gpu/ for a lent GPU machine (see scripts/gpu_check.sh, which runs there). Run it here, in
# the repository root's venv (`make install` first); it needs PyPI, which the GPU machine cannot reach.
#
# The GPU machine has torch, transformers, peft, accelerate, rich, pyyaml and pytest, and lacks
# bitsandbytes, hydra-core, omegaconf (and its antlr4 runtime) and this package. The embedded model's
# wheel (93 MB) is over the 64 MiB the device tool carries, so the SmolLM2 tokenizer that
# scripts/bench_gpu.py gives its random-weight models travels as a saved copy (~3 MB).
#   .gpu/wheels/     the missing packages (the versions installed here, which CI tests) and rlhf-cli
#   .gpu/tokenizer/  the SmolLM2-135M-Instruct tokenizer
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
KIT=.gpu
LIMIT_MIB=60  # the device tool carries 64 MiB with the working tree (about 1 MiB)

version() { "$PYTHON" -c "from importlib.metadata import version; print(version('$1'))"; }

rm -rf "$KIT" build
mkdir -p "$KIT/wheels"
# the GPU machine's Python is 3.12 on x86-64; these are pure-Python or manylinux wheels
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$KIT/wheels" "bitsandbytes==$(version bitsandbytes)" "hydra-core==$(version hydra-core)" \
    "omegaconf==$(version omegaconf)"
# antlr4's runtime (omegaconf's parser) is published only as an sdist: build its wheel here
"$PYTHON" -m pip wheel -q --no-deps -w "$KIT/wheels" \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" .
rm -rf build
"$PYTHON" - "$KIT/tokenizer" <<'PY'
import sys

from transformers import AutoTokenizer

from rlhf_cli.modeling import resolve_model_path

AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m")).save_pretrained(sys.argv[1])
PY
ls -l "$KIT/wheels"
size=$(du -sm "$KIT" | cut -f1)
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "$KIT is $size MiB, over the $LIMIT_MIB MiB that can travel with the working tree." >&2
    exit 1
fi
echo "$KIT: $size MiB. On the GPU machine: run(command='bash scripts/gpu_check.sh', carry=['.gpu'], timeout_s=600)"
