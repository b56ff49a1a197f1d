"""Reference data for the GPT-2 parity test (crates/rustspeed-models/tests/gpt2_golden.rs).

Builds a tiny random GPT2LMHeadModel with transformers (seeded, dropout 0), saves it with
save_pretrained (safetensors), runs one batch with HF-style (unshifted) labels, some -100, and
records the inputs, logits, loss and every parameter's gradient, all float32:

    crates/rustspeed-models/tests/golden/gpt2/       f32 checkpoint
    crates/rustspeed-models/tests/golden/gpt2_bf16/  same model saved in bf16; the reference is
                                                     computed in f32 from the bf16-rounded weights

Run by hand:  /work/golden-venv/bin/python tools/golden/gpt2_golden.py
"""

import os
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "rustspeed-models", "tests", "golden")
B, T, VOCAB = 2, 12, 96


def make_batch():
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, -4:] = -100  # right padding
    return input_ids, labels


def run_case(name, dtype):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=2, n_positions=32,
        embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    # Larger-than-default weights so that attention is far from uniform and the test is sharp.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)
    model = model.float()
    model.train()  # dropout is 0: train() only matters for gradients being kept
    input_ids, labels = make_batch()
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": input_ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
    }
    for n, p in model.named_parameters():
        tensors[f"grad.{n}"] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(out_dir, "golden.safetensors"))
    print(name, "loss", out.loss.item())


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    run_case("gpt2", torch.float32)
    run_case("gpt2_bf16", torch.bfloat16)
