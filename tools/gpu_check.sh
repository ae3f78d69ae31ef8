#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU (run by hand; CI has no GPU and uses lavapipe instead):
#   1. builds mitune with the Vulkan backend (`--features vulkan`; cubecl's SPIR-V path) and the portable wgpu one,
#   2. runs the transformers parity fixtures (logits, greedy ids, masked loss and connector gradient) on the GPU,
#   3. runs `mitune bench train --preset 1b` there and reports tokens/s and model FLOP utilisation (MFU).
#
#   tools/gpu_check.sh [vulkan|wgpu|cuda]          (default: vulkan)
#   PEAK_TFLOPS=67 tools/gpu_check.sh              (the GPU's f32 peak, if the table below does not know it)
#
# CUDA: `--features cuda` pulls cubecl-llvm, whose build script downloads an LLVM bundle. Offline, place the
# bundle and its checksum file where it looks first, ~/.cache/tracel/tracel-llvm-<version>-linux-x64.tar.xz and
# ~/.cache/tracel/tracel-llvm-<version>-linux-x64.checksums.json (copied from a machine that built it once), and
# export TRACEL_LLVM_BUNDLER_SKIP_CHECKSUM_DOWNLOAD=1; then `tools/gpu_check.sh cuda`.
#
# A GPU machine without Rust (as this project's lent H200s, 2026-12-04): build here instead and carry the stripped
# binaries — `target/release/mitune` and the test binaries `target/release/deps/{parity,gpu}-*` (built with
# `cargo test --release --features wgpu --no-run`) — plus the Vulkan loader packages; the test binaries look for
# fixtures under the build machine's checkout path (CARGO_MANIFEST_DIR), so link that path to the copy there.
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${1:-vulkan}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"

echo "== build --features $backend"
cargo build --release --features "$backend"

echo "== parity fixtures on $backend"
MITUNE_DEVICE="$backend" cargo test --release --features "$backend" --test parity -- --nocapture 2>&1 |
  grep -E "max \|Δ|test result|panicked" || true

echo "== bench train --preset 1b on $backend"
out="$(MITUNE_DEVICE="$backend" target/release/mitune bench train --preset 1b --json)"
echo "$out"

# f32 peak TFLOP/s (non-tensor-core FP32, what mitune's f32 kernels can use) of common GPUs
peak="${PEAK_TFLOPS:-}"
if [ -z "$peak" ]; then
  case "$gpu" in
    *H200*|*H100*SXM*|*"H100 80GB HBM3"*) peak=67 ;;
    *H100*) peak=51 ;;
    *A100*) peak=19.5 ;;
    *L40S*) peak=91.6 ;;
    *4090*) peak=82.6 ;;
    *) peak="" ;;
  esac
fi
python3 - "$out" "$peak" <<'PY'
import json, sys
r = json.loads(sys.argv[1].strip().splitlines()[-1])
peak = float(sys.argv[2]) if sys.argv[2] else None
tokens = r["batch"] * r["seq"]
# 6·N·T: forward 2N + backward 4N per token, the usual MFU convention (with LoRA the frozen weights' gradients
# are not formed, so the work done is nearer 4·N·T: MFU by this count is an upper bound)
flops = 6 * r["params"] * tokens / r["step_s_median"]
print(f"tokens/s {r['tokens_per_s']:.1f}, step {r['step_s_median']:.2f} s, model {flops / 1e12:.2f} TFLOP/s", end="")
print(f", MFU {100 * flops / 1e12 / peak:.1f}% of {peak} TFLOP/s f32" if peak else " (set PEAK_TFLOPS for MFU)")
PY
