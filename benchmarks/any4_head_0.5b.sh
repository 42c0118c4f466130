#!/usr/bin/env bash
# Issue 15 items 1-2 on the MiniCPM4 0.5b preset (random weights, real shapes, the preset's InfLLM v2
# sparse_config): any4 with the default int8 tied head, any4 with the previous default fp32 head (--lm-head none)
# and W4A8 (--quant any4-w4a8, int8 head), each exported at --max-context 16640 like benchmarks/executorch_0.5b.sh;
# then benchmarks/decode_speed.py times them in one process, round-robin (2 threads) -> STEM.json + STEM.png.
# About 35 minutes on the shared 2-core machine (exports ~10 min each under load). BENCH_DIR: default out/bench.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-out/bench}
P=.venv/bin/pocketllm
STEM=${STEM:-benchmarks/results/any4_head_0.5b}
ROUNDS=${ROUNDS:-6}
mkdir -p "$B" "$(dirname "$STEM")"

[ -d "$B/mc05b" ] || $P init-checkpoint --arch minicpm4 --preset 0.5b --out "$B/mc05b" --seed 0
export_variant() {  # name, export flags...
  local name=$1; shift
  [ -f "$B/$name/manifest.json" ] || /usr/bin/time -v $P export --checkpoint "$B/mc05b" --target executorch \
      --max-context 16640 --out "$B/$name" --force --threads 2 "$@" 2> >(tee "$B/$name.time" >&2)
}
export_variant any4 --quant any4                          # default: tied head/table int8 per channel, stored once
export_variant any4-fp32head --quant any4 --lm-head none   # the previous default: fp32 head (+ bf16 gather table)
export_variant any4-w4a8 --quant any4-w4a8                 # int8 activations in the decoder layers, int8 head

.venv/bin/python benchmarks/decode_speed.py --threads 2 --contexts 0,1024 --rounds "$ROUNDS" \
    --bundle any4-fp32head="$B/any4-fp32head" --bundle any4="$B/any4" --bundle any4-w4a8="$B/any4-w4a8" \
    --out "$STEM"
