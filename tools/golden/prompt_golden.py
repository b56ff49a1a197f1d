#!/usr/bin/env python3
"""PEFT prompt-tuning goldens (PROMPT_TUNING) on the tiny GPT-2 and LLaMA of
crates/rustspeed-models/tests/golden. Run by hand:

    /work/golden-venv/bin/python tools/golden/prompt_golden.py
    /work/golden-venv/bin/python tools/golden/prompt_golden.py --check DIR CASE

For each case (prompt_gpt2, prompt_llama) it writes crates/rustspeed-models/tests/golden/<case>/:
  adapter/             a PEFT prompt-tuning adapter (save_pretrained): prompt_embeddings [n, d]
  golden.json          the batch (input ids and HF labels, without the virtual tokens), PEFT's
                       loss on it (virtual tokens prepended, their labels -100)
  logits.safetensors   PeftModel's logits [B, n + T, vocab] (virtual positions included) and the
                       gradient of the loss with respect to prompt_embeddings

--check DIR CASE: DIR holds an adapter written by rustspeed; PEFT loads it onto the case's base
and must give the golden loss (so both the format and the values survived the round trip).
"""

import json
import os
import sys

import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "..", "crates", "rustspeed-models", "tests", "golden")
B, T, N_VIRTUAL = 2, 10, 3
CASES = {"prompt_gpt2": "gpt2", "prompt_llama": "llama"}


def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(
        os.path.join(MODELS, model_dir), dtype=torch.float32, attn_implementation="eager")


def batch(vocab):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt; row 1's first label makes the last virtual token predict
    labels[1, -1] = -100
    return ids, labels


def main():
    for case, model_dir in CASES.items():
        torch.manual_seed(3)
        model = get_peft_model(base(model_dir), PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="RANDOM"))
        out = os.path.join(MODELS, case)
        model.save_pretrained(os.path.join(out, "adapter"))
        os.remove(os.path.join(out, "adapter", "README.md"))
        model.eval()  # no dropout (the tiny models have none anyway)
        ids, labels = batch(model.config.vocab_size)
        res = model(input_ids=ids, labels=labels)
        res.loss.backward()
        emb = model.prompt_encoder["default"].embedding.weight
        save_file({"logits": res.logits.detach().contiguous(),
                   "prompt_grad": emb.grad.detach().contiguous()},
                  os.path.join(out, "logits.safetensors"))
        with open(os.path.join(out, "golden.json"), "w") as f:
            json.dump({"model": model_dir, "num_virtual_tokens": N_VIRTUAL,
                       "input_ids": ids.tolist(), "labels": labels.tolist(),
                       "loss": res.loss.item()}, f, indent=1)
        print(case, "loss", res.loss.item(), "logits", tuple(res.logits.shape))


def check(dir_, case):
    with open(os.path.join(MODELS, case, "golden.json")) as f:
        g = json.load(f)
    model = PeftModel.from_pretrained(base(CASES[case]), dir_)
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(g["input_ids"]),
                     labels=torch.tensor(g["labels"])).loss.item()
    err = abs(loss - g["loss"]) / abs(g["loss"])
    print(f"{case}: PEFT loads {dir_}; loss {loss} vs golden {g['loss']} (rel {err:.2e})")
    sys.exit(0 if err < 1e-6 else 1)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    else:
        main()
