#!/usr/bin/env python3
"""PEFT prompt-learning goldens (PROMPT_TUNING, P_TUNING, PREFIX_TUNING) on the tiny GPT-2 and
LLaMA (grouped-query: 4 heads, 2 KV heads) of crates/rustspeed-models/tests/golden. Run by hand:

    /work/golden-venv/bin/python tools/golden/prompt_golden.py
    /work/golden-venv/bin/python tools/golden/prompt_golden.py --check DIR CASE

For each case (prompt_*, ptuning_* (MLP), ptuninglstm_*, prefix_* and prefixproj_* for gpt2 and
llama) it writes
crates/rustspeed-models/tests/golden/<case>/:
  adapter/             the PEFT adapter (save_pretrained): prompt_embeddings [n, width], the
                       encoder's output for P-tuning and the prefix projection
  golden.json          the batch (input ids and HF labels, without the virtual tokens), PEFT's
                       loss on it (virtual tokens prepended with their labels -100; prefix
                       tuning: the prefix as past_key_values), the loss PEFT gives after
                       loading the saved adapter, PEFT's trainable / all parameter counts
  logits.safetensors   PeftModel's logits ([B, n + T, vocab] with virtual positions, [B, T,
                       vocab] for prefix tuning) and `grad.<name>`: the gradient of the loss
                       with respect to every trainable parameter, named as rustspeed names
                       them (PEFT's name without `.default`; `prompt_embeddings` for the
                       encoder-less embedding)
  encoder.safetensors  (P-tuning, prefix projection) the trained parameters before the
                       encoder, under the same names

and crates/rustspeed-cli/tests/golden/train/prompt_text_init.safetensors: PEFT's TEXT
initialisation (`prompt_embeddings`) of a 6-token prompt from "the fox" on the CLI tests' tiny
GPT-2 (tokens repeated to fill the prompt).

--check DIR CASE: DIR holds an adapter written by rustspeed; PEFT loads it onto the case's base
and must give the golden loss (so both the format and the values survived the round trip).
"""

import json
import os
import sys

import torch
from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model)
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "..", "crates", "rustspeed-models", "tests", "golden")
B, T, N_VIRTUAL = 2, 10, 3
CASES = {f"{m}_{b}": b for m in ["prompt", "ptuning", "ptuninglstm", "prefix", "prefixproj"]
         for b in ["gpt2", "llama"]}
ENC_HIDDEN = 16


def peft_config(method):
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    if method == "prompt":
        return PromptTuningConfig(prompt_tuning_init="RANDOM", **common)
    if method == "ptuning":
        return PromptEncoderConfig(encoder_reparameterization_type="MLP",
                                   encoder_hidden_size=ENC_HIDDEN, **common)
    if method == "ptuninglstm":
        return PromptEncoderConfig(encoder_reparameterization_type="LSTM",
                                   encoder_hidden_size=ENC_HIDDEN, **common)
    if method == "prefix":
        return PrefixTuningConfig(**common)
    return PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=ENC_HIDDEN, **common)


def our_name(peft_name, has_encoder):
    name = peft_name.replace("prompt_encoder.default.", "prompt_encoder.")
    if name == "prompt_encoder.embedding.weight" and not has_encoder:
        return "prompt_embeddings"
    return name


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
        method = case.split("_")[0]
        torch.manual_seed(3)
        model = get_peft_model(base(model_dir), peft_config(method))
        out = os.path.join(MODELS, case)
        model.save_pretrained(os.path.join(out, "adapter"))
        os.remove(os.path.join(out, "adapter", "README.md"))
        trainable, total = model.get_nb_trainable_parameters()
        model.eval()  # no dropout (the tiny models have none anyway)
        ids, labels = batch(model.config.vocab_size)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        has_encoder = len(params) > 1
        if has_encoder:
            save_file({our_name(n, True): p.detach().contiguous() for n, p in params.items()},
                      os.path.join(out, "encoder.safetensors"))
        res = model(input_ids=ids, labels=labels)
        res.loss.backward()
        tensors = {"logits": res.logits.detach().contiguous()}
        for n, p in params.items():
            tensors["grad." + our_name(n, has_encoder)] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(out, "logits.safetensors"))
        reloaded = saved_loss(os.path.join(out, "adapter"), model_dir, ids, labels)
        with open(os.path.join(out, "golden.json"), "w") as f:
            json.dump({"model": model_dir, "num_virtual_tokens": N_VIRTUAL,
                       "input_ids": ids.tolist(), "labels": labels.tolist(),
                       "loss": res.loss.item(), "saved_adapter_loss": reloaded,
                       "trainable_params": trainable, "all_params": total}, f, indent=1)
        print(case, "loss", res.loss.item(), "reloaded", reloaded, "logits",
              tuple(res.logits.shape), "trainable", trainable, "all", total)


def text_init():
    model_dir = os.path.join(HERE, "..", "..", "crates", "rustspeed-cli", "tests", "golden",
                             "train", "model")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="the fox", tokenizer_name_or_path=model_dir))
    w = model.prompt_encoder["default"].embedding.weight.detach().contiguous()
    save_file({"prompt_embeddings": w},
              os.path.join(model_dir, "..", "prompt_text_init.safetensors"))
    print("text init", tuple(w.shape))


def saved_loss(dir_, model_dir, ids, labels):
    model = PeftModel.from_pretrained(base(model_dir), dir_)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def check(dir_, case):
    with open(os.path.join(MODELS, case, "golden.json")) as f:
        g = json.load(f)
    loss = saved_loss(dir_, CASES[case], torch.tensor(g["input_ids"]), torch.tensor(g["labels"]))
    err = abs(loss - g["loss"]) / abs(g["loss"])
    print(f"{case}: PEFT loads {dir_}; loss {loss} vs golden {g['loss']} (rel {err:.2e})")
    sys.exit(0 if err < 1e-6 else 1)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    else:
        main()
        text_init()
