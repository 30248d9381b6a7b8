#!/usr/bin/env bash
# btrm GPU check: packed-vs-unpacked correctness per attention backend in bf16, then tokens/s and MFU at 16K packs
# for Qwen3-0.6B/1.7B-shaped models (packed, packed + gradient checkpointing, padded baseline). One call of < 8
# minutes on one H100/H200, no network. Needs torch + transformers only (no DeepSpeed, no datasets).
# On >= 2 GPUs with DeepSpeed and datasets installed (WHEELS=...), an SP row also trains with Ulysses sequence
# parallelism over every GPU against SP = 1 (a few more minutes: --budget-s); otherwise it prints why it skipped.
#
#   scripts/gpu_check.sh                 # JSON in $OUT/gpu_check.json (default ./gpu_check_out), table printed last
#   DRY_RUN=1 scripts/gpu_check.sh       # the same code path on CPU with tiny shapes (CI: tests/test_gpu_check.py)
#   WHEELS=/dir scripts/gpu_check.sh     # install wheels offline first (e.g. flash-attn): pip install --no-index
#
# Extra arguments go to scripts/gpu_check.py (--models qwen3-1.7b, --steps 8, --budget-s 300, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"  # the GPU image has python3, not python
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/*.whl 2>&1 | tail -n 3
fi
# btrm from this checkout, nothing to build or download
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
if [[ "${DRY_RUN:-0}" == "0" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv \
    > "$OUT/nvidia-smi.csv" 2>&1 || true
fi
"$PYTHON" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
