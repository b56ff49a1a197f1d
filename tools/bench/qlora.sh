#!/usr/bin/env bash
# QLoRA / LoRA / full fine-tuning on a TinyLlama-1.1B-shaped model: rustspeed vs PyTorch + PEFT,
# same shapes, same thread count, one after the other (docs/BENCHMARKS.md, issue 7).
# Usage: tools/bench/qlora.sh PYTHON [BASE...]   (default bases: nf4 bf16 f32)
#        PYTHON: an interpreter with torch, transformers, peft (and bitsandbytes for nf4)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:?usage: tools/bench/qlora.sh PYTHON [BASE...]}
shift
bases=${*:-nf4 bf16 f32}
steps=${STEPS:-3}
seq=${SEQ:-512}
threads=${THREADS:-2}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads THREADS=$threads
cargo build --release -q -p rustspeed --example bench_qlora
for base in $bases; do
  echo "# $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  target/release/examples/bench_qlora "$base" "$steps" "$seq"
  "$py" tools/bench/qlora_torch.py "$base" "$steps" "$seq" 2>/dev/null
done
