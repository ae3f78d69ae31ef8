#!/usr/bin/env bash
# Per connector of recipes/sweeps/connector-zoo.toml, on the shapes world: connector parameters, image tokens per
# image, median align step (connector trained) and instruct step (connector + LLM trained), and the run's peak RSS.
# Runs each configuration for 40 align + 20 instruct steps (held-out generation on 1 sample) one after the other.
#   cargo build --release && bash tools/bench_connectors.sh [32|64] > /tmp/connectors.md
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-32}"
bin=target/release/mitune
out=$(mktemp -d)
cat > "$out/bench.toml" <<TOML
extends = "$PWD/recipes/quickstart.toml"
name = "bench"
output = "$out"
[model.encoder]
image_size = $size
[stages.align]
max_steps = 40
max_len = 128
log_every = 1
[stages.instruct]
max_steps = 20
max_len = 224
log_every = 1
eval = { every = 1000, max_samples = 1, data = { sources = [{ kind = "llava_json", path = "datasets/shapes/vqa_heldout.json" }] } }
[heldout]
limit = 1
TOML
connectors=(
  '{ kind = "mlp", depth = 2 }'
  '{ kind = "pixel_shuffle", scale = 2 }'
  '{ kind = "pool", factor = 2 }'
  '{ kind = "resampler", latents = 4, depth = 2, heads = 4, kv_heads = 2 }'
  '{ kind = "resampler", latents = 16, depth = 2, heads = 4, kv_heads = 2 }'
  '{ kind = "qformer", queries = 32, layers = 2, heads = 4 }'
  '{ kind = "qformer", queries = 64, layers = 2, heads = 4 }'
)
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "| connector | image px | connector params | image tokens | align step (ms) | instruct step (ms) | peak RSS (MB) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for c in "${connectors[@]}"; do
  sets=(--set "model.connector=$c")
  tokens=$($bin validate "$out/bench.toml" "${sets[@]}" 2>&1 | grep -o 'gives [0-9]* image tokens' | grep -o '[0-9]*' || true)
  log=$( { /usr/bin/time -v $bin train "$out/bench.toml" "${sets[@]}" --fresh; } 2>&1 || true)
  params=$(grep -o 'training connector ([0-9]* of' <<<"$log" | head -1 | grep -o '[0-9]*')
  rss=$(grep 'Maximum resident set size' <<<"$log" | grep -o '[0-9]*$')
  m="$out/bench/metrics.jsonl"
  a=$(grep '"stage":"align"' "$m" | grep -o '"step_s":[0-9.e-]*' | cut -d: -f2 | tail -n +5 | median)
  i=$(grep '"stage":"instruct"' "$m" | grep -o '"step_s":[0-9.e-]*' | cut -d: -f2 | tail -n +5 | median)
  printf '| `%s` | %s | %s | %s | %.0f | %.0f | %.0f |\n' "$c" "$size" "$params" "$tokens" \
    "$(echo "$a*1000" | bc -l)" "$(echo "$i*1000" | bc -l)" "$(echo "$rss/1024" | bc -l)"
done
rm -rf "$out"
