#!/usr/bin/env python3
"""LoRA goldens from HF PEFT on the tiny GPT-2 and LLaMA of crates/rustspeed-models/tests/golden.
Run by hand:

    /work/golden-venv/bin/python tools/golden/lora_golden.py
    /work/golden-venv/bin/python tools/golden/lora_golden.py --check DIR   # see below

For each case (lora_gpt2, lora_llama) it writes
crates/rustspeed-models/tests/golden/<case>/:
  adapter/                  a PEFT adapter (save_pretrained) with non-zero B and trained-looking
                            biases, so that every part of it changes the outputs
  golden.json               the batch, PEFT's eval loss on it, print_trainable_parameters' counts
  logits.safetensors        PeftModel's logits on the batch (eval mode)
  merged.safetensors        merge_and_unload()'s state dict
and crates/rustspeed/tests/golden/<case>/:
  golden.json               ds_config, 10 steps of losses, grad norms, lrs, batches
  final_adapter.safetensors the adapter's trainable tensors after the 10 steps (PEFT's keys)

Training: a plain torch loop (no Trainer) starting from the saved adapter: AdamW over the
trainable parameters (foreach=False), DeepSpeed's clipping formula coef = max / (norm + 1e-6),
loss = mean NLL over label tokens, lora_dropout 0 so both sides are deterministic.

--check DIR: DIR holds an adapter written by rustspeed (adapter_config.json,
adapter_model.safetensors) and rustspeed_eval.json {"case": ..., "loss": ...}; loads it with
PeftModel.from_pretrained on the case's base model and compares the eval loss.
"""

import json
import math
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "..", "crates", "rustspeed-models", "tests", "golden")
TRAIN_OUT = os.path.join(HERE, "..", "..", "crates", "rustspeed", "tests", "golden")
B, T, STEPS = 2, 12, 10

CASES = {
    # Conv1D (fan_in_fan_out), LoRA-only biases trained and saved as base_layer.bias.
    "lora_gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                               fan_in_fan_out=True, bias="lora_only", lora_dropout=0.0)),
    # all-linear with rsLoRA and a whole module trained (lm_head).
    "lora_llama": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True,
                                 modules_to_save=["lm_head"], lora_dropout=0.0)),
}

DS_CONFIG = {
    "train_batch_size": B,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
                                               "weight_decay": 0.0}},
    "gradient_clipping": 1.0,
}


def base(model_dir):
    return AutoModelForCausalLM.from_pretrained(
        os.path.join(MODELS, model_dir), dtype=torch.float32, attn_implementation="eager")


def batches(vocab, seed, n):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        labels[1, -2:] = -100
        out.append((ids, labels))
    return out


def make_adapter(case, model_dir, kwargs):
    torch.manual_seed(1)
    model = get_peft_model(base(model_dir), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.requires_grad and name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    out = os.path.join(MODELS, case)
    model.save_pretrained(os.path.join(out, "adapter"))
    os.remove(os.path.join(out, "adapter", "README.md"))  # a model card, not read by anyone
    return out


def trainable_counts(model):
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total


def golden_eval(case, model_dir, out):
    model = PeftModel.from_pretrained(base(model_dir), os.path.join(out, "adapter"))
    model.eval()
    (ids, labels), = batches(model.config.vocab_size, 99, 1)
    with torch.no_grad():
        res = model(input_ids=ids, labels=labels)
    trainable, total = trainable_counts(PeftModel.from_pretrained(
        base(model_dir), os.path.join(out, "adapter"), is_trainable=True))
    save_file({"logits": res.logits.contiguous()}, os.path.join(out, "logits.safetensors"))
    merged = model.merge_and_unload()
    state = {k: v.contiguous() for k, v in merged.state_dict().items()}
    if merged.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out, "merged.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"model": model_dir, "input_ids": ids.tolist(), "labels": labels.tolist(),
                   "loss": res.loss.item(), "trainable_params": trainable,
                   "all_params": total}, f, indent=1)
    print(case, "eval loss", res.loss.item(), "trainable", trainable, "of", total)


def golden_train(case, model_dir, out):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(base(model_dir), os.path.join(out, "adapter"),
                                      is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = DS_CONFIG["optimizer"]["params"]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], foreach=False, fused=False)
    losses, norms, lrs, data = [], [], [], []
    for ids, labels in batches(model.config.vocab_size, 1234, STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=False)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = [p.grad for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = DS_CONFIG["gradient_clipping"] / (norm.item() + 1e-6)
        if coef < 1:
            for g in grads:
                g.mul_(coef)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
        data.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    dst = os.path.join(TRAIN_OUT, case)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "golden.json"), "w") as f:
        json.dump({"model": model_dir, "adapter": case, "ds_config": DS_CONFIG, "losses": losses,
                   "grad_norms": norms, "lrs": lrs, "batches": data}, f, indent=1)
    from peft.utils import get_peft_model_state_dict
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, os.path.join(dst, "final_adapter.safetensors"), metadata={"format": "pt"})
    print(case, "losses", [round(x, 5) for x in losses])


def check(dir_):
    with open(os.path.join(dir_, "rustspeed_eval.json")) as f:
        ours = json.load(f)
    case = ours["case"]
    model_dir, _ = CASES[case]
    with open(os.path.join(MODELS, case, "golden.json")) as f:
        g = json.load(f)
    model = PeftModel.from_pretrained(base(model_dir), dir_)
    model.eval()
    ids, labels = torch.tensor(g["input_ids"]), torch.tensor(g["labels"])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    err = abs(loss - ours["loss"]) / abs(loss)
    print(f"{case}: PEFT loads rustspeed's adapter from {dir_}; PEFT eval loss {loss}, "
          f"rustspeed {ours['loss']}, relative difference {err:.2e}")
    if err > 1e-5:
        sys.exit(1)


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
        sys.exit(0)
    for case, (model_dir, kwargs) in CASES.items():
        out = make_adapter(case, model_dir, kwargs)
        golden_eval(case, model_dir, out)
        golden_train(case, model_dir, out)
