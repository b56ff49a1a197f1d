#!/usr/bin/env python3
"""Golden training runs for the engine: 10 optimizer steps of PyTorch on the tiny goldens of
crates/rustspeed-models/tests/golden/{gpt2,llama}, with DeepSpeed's semantics where they
differ from PyTorch's defaults. Run by hand:

    /work/golden-venv/bin/python tools/golden/train_golden.py

For each case it writes crates/rustspeed/tests/golden/<case>/:
  golden.json           the ds_config used, per-step losses, grad norms (global L2 before
                        clipping), learning rates used, and the batches (input_ids, HF labels)
  final.safetensors     every parameter after the last step (f32, HF names)

Semantics (DeepSpeed 0.19, fp32, ZeRO off, one rank, gradient_accumulation_steps 1):
  * loss = mean NLL over the micro-batch's label tokens (HF's causal-LM loss)
  * clipping: coef = max_norm / (norm + 1e-6), applied when coef < 1 (DeepSpeed's formula,
    which equals torch.nn.utils.clip_grad_norm_'s)
  * AdamW (DeepSpeed "AdamW": decoupled decay), torch's single-tensor implementation
  * weight decay groups as HF Trainer: no decay for biases and norm weights
  * WarmupLR: lr(i) = min + (max - min) * gamma(i); construction writes lr(-1) = min and the
    scheduler steps after each optimizer step, so step k (1-based) runs at lr(k - 2): the first
    two steps both at warmup_min_lr (DeepSpeed's order of events)
  * a tied weight (GPT-2's wte = lm_head) is one parameter, stepped once per step
"""

import json
import math
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "..", "crates", "rustspeed-models", "tests", "golden")
OUT = os.path.join(HERE, "..", "..", "crates", "rustspeed", "tests", "golden")
B, T, STEPS = 2, 12, 10


def batches(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100  # a masked prompt
        labels[1, -2:] = -100  # padding
        out.append((ids, labels))
    return out


def warmup_lr(i, lo, hi, w, kind):
    # DeepSpeed's WarmupLR: construction (i = -1) writes the minimum.
    if i < 0:
        return lo
    w = max(2, w)
    if i >= w:
        return hi
    gamma = math.log(i + 1) / math.log(w) if kind == "log" else i / w
    return lo + (hi - lo) * gamma


def run(case, model_dir, ds_config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(MODELS, model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    opt_params = ds_config["optimizer"]["params"]
    decay, no_decay, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            # A tied weight (GPT-2's lm_head is wte) appears under two modules: listing it
            # twice would make torch step it twice per optimizer step.
            if id(p) in seen:
                continue
            seen.add(id(p))
            is_norm = "Norm" in type(module).__name__
            (no_decay if is_norm or p_name == "bias" else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": opt_params.get("weight_decay", 0.0)},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=opt_params["lr"],
        betas=tuple(opt_params.get("betas", (0.9, 0.999))),
        eps=opt_params.get("eps", 1e-8),
        foreach=False,
        fused=False,
    )
    sched = ds_config.get("scheduler")
    max_norm = ds_config.get("gradient_clipping", 1.0)
    losses, norms, lrs, data = [], [], [], []
    for i, (ids, labels) in enumerate(batches(model.config.vocab_size, 1234)):
        if sched:
            p = sched["params"]
            # DeepSpeed steps the scheduler after each optimizer step, starting from
            # last_batch_iteration -1 at construction: step i (0-based) runs at lr(i - 1).
            lr = warmup_lr(i - 1, p["warmup_min_lr"], p["warmup_max_lr"], p["warmup_num_steps"],
                           p.get("warmup_type", "log"))
            for group in opt.param_groups:
                group["lr"] = lr
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=False)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm > 0:
            coef = max_norm / (norm.item() + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
        data.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    out = os.path.join(OUT, case)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"model": model_dir, "ds_config": ds_config, "losses": losses,
                   "grad_norms": norms, "lrs": lrs, "batches": data}, f, indent=1)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(state, os.path.join(out, "final.safetensors"), metadata={"format": "pt"})
    print(case, "losses", [round(x, 5) for x in losses])


PLAIN = {
    "train_batch_size": B,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                               "weight_decay": 0.0}},
    "gradient_clipping": 1.0,
}
WARMUP = {
    "train_batch_size": B,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                               "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3,
                                                 "warmup_num_steps": 5, "warmup_type": "linear"}},
    "gradient_clipping": 0.5,
}

if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    run("gpt2_adamw", "gpt2", PLAIN)
    run("gpt2_warmup_wd", "gpt2", WARMUP)
    run("llama_adamw", "llama", PLAIN)
    run("llama_warmup_wd", "llama", WARMUP)
