#!/usr/bin/env bash
# The ExecuTorch numbers of README.md: MiniCPM4 0.5b preset (random weights, real shapes), 2 threads.
#   exports: any4 (timed: wall clock and peak RSS), 8da4w, fp32, and any4 with dense attention (same weights);
#   then benchmarks/decode_speed.py times every variant in one process, round-robin -> STEM.json + STEM.png.
# About 25 minutes on the 2-core CI machine (exports ~15, timing ~10). BENCH_DIR (default out/bench) holds checkpoints and bundles.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BENCH_DIR:-out/bench}
P=.venv/bin/pocketllm
STEM=${STEM:-benchmarks/results/executorch_0.5b}
mkdir -p "$B" "$(dirname "$STEM")"

[ -d "$B/mc05b" ] || $P init-checkpoint --arch minicpm4 --preset 0.5b --out "$B/mc05b" --seed 0
# The released 0.5B config has no sparse_config (dense); InfLLM v2 is enabled as MiniCPM4's model card says, by
# adding upstream's sparse_config to config.json.
.venv/bin/python -c "import json,sys; from pocketllm.export.families.minicpm4.presets import SPARSE_UPSTREAM; \
c=json.load(open(sys.argv[1])); c.setdefault('sparse_config', SPARSE_UPSTREAM); \
json.dump(c, open(sys.argv[1], 'w'), indent=2)" "$B/mc05b/config.json"

# any4 with InfLLM v2 (upstream's sparse_config: dense below 8192 tokens), cache for 16K + a prefill chunk.
if [ ! -f "$B/any4/manifest.json" ]; then
  /usr/bin/time -v $P export --checkpoint "$B/mc05b" --target executorch --quant any4 --max-context 16640 \
      --out "$B/any4" --force --threads 2 2> >(tee "$B/any4.time" >&2)
fi
# The same quantized weights with dense attention (sparse_config removed): llama::custom_sdpa.
if [ ! -f "$B/any4-dense/manifest.json" ]; then
  rm -rf "$B/any4-dense-ckpt" && mkdir "$B/any4-dense-ckpt"
  for f in "$B"/any4/reference/*; do ln -s "$(realpath "$f")" "$B/any4-dense-ckpt/"; done
  rm "$B/any4-dense-ckpt/config.json"
  .venv/bin/python -c "import json,sys; c=json.load(open(sys.argv[1])); c.pop('sparse_config'); \
json.dump(c, open(sys.argv[2], 'w'), indent=2)" "$B/any4/reference/config.json" "$B/any4-dense-ckpt/config.json"
  $P export --checkpoint "$B/any4-dense-ckpt" --target executorch --max-context 16640 --out "$B/any4-dense" \
      --force --threads 2
fi
for q in 8da4w none; do
  [ -f "$B/$q/manifest.json" ] || $P export --checkpoint "$B/mc05b" --target executorch --quant $q \
      --max-context 4352 --out "$B/$q" --force --threads 2
done

.venv/bin/python benchmarks/decode_speed.py --threads 2 --eager "$B/mc05b" --eager-max-context 4352 \
    --bundle fp32="$B/none" --bundle 8da4w="$B/8da4w" --bundle any4="$B/any4" --bundle any4-dense="$B/any4-dense" \
    --contexts 0,1024,4096 --long-contexts 16384 --long-variants any4,any4-dense --out "$STEM"
