#!/usr/bin/env bash
# GPT-2 forward+backward, rustspeed vs PyTorch, same shapes, same thread count, one run.
# Usage: tools/bench/gpt2_step.sh [PYTHON]   (PYTHON: an interpreter with torch + transformers)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-python3}
threads=${THREADS:-2}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
cargo build --release -q -p rustspeed-models --example bench_gpt2_step
bin=target/release/examples/bench_gpt2_step
for spec in "124m f32 4 128" "124m bf16 4 128" "23m f32 4 128" "23m bf16 4 128"; do
  set -- $spec
  "$bin" "$1" "$2" "$3" "$4" 3
  "$py" tools/bench/gpt2_step_torch.py --model "$1" --dtype "$2" --batch "$3" --seq "$4" --steps 3 --threads "$threads" 2>/dev/null
done
