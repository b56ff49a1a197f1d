#!/usr/bin/env bash
# ZeRO stages 0-3 at world 1 and 2 on a GPT-2 124M-shaped model trained from scratch: tokens/s and
# each rank's model-state bytes (the train summary's memory line) and peak RSS (docs/BENCHMARKS.md,
# issue 6). Usage: tools/bench/zero_stages.sh [STEPS]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-5}
cargo build --release -q -p rustspeed-cli
bin=target/release/rustspeed
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=$work/gpt2-124m
mkdir -p "$model"
cp assets/models/gpt2-124m/config.json "$model/"
cp crates/rustspeed-cli/tests/golden/train/model/tokenizer{,_config}.json "$model/"
python3 - "$work/text.jsonl" <<'PY'
import json, sys
words = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun".split()
with open(sys.argv[1], "w") as f:
    for i in range(400):
        f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(200))}) + "\n")
PY
# "3low": stage 3 with DeepSpeed's low-memory knobs (re-gather in backward, little prefetch);
# with the defaults (max_reuse_distance 1e9) a 124M model keeps every layer gathered from its
# forward to its backward, as DeepSpeed does.
for world in 1 2; do
  for stage in 0 1 2 3 3low; do
    [ "$stage" = 3low ] && [ "$world" = 1 ] && continue
    cfg=$work/ds-$stage.json
    zero="\"stage\": $stage"
    [ "$stage" = 3low ] && zero='"stage": 3, "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 1e7'
    printf '{"train_batch_size": 4, "gradient_accumulation_steps": 1, "bf16": {"enabled": true},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {%s}}' "$zero" > "$cfg"
    out=$work/out-$world-$stage
    extra=()
    [ "$world" -gt 1 ] && extra=(--nproc-per-node "$world")
    echo "# world $world stage $stage $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$bin" train --model "$model" --from-scratch --data "$work/text.jsonl" --deepspeed "$cfg" \
      --output-dir "$out" --max-steps "$steps" --block-size 128 --no-shuffle --warmup-steps 1 \
      --save-steps 0 "${extra[@]}" 2>&1 | grep -E "trained [0-9]+ steps|ZeRO stage [0-3]: model states" || true
  done
done
