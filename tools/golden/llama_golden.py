#!/usr/bin/env python3
"""Golden outputs of tiny random LLaMA-family models, for rustspeed's parity tests.

Run by hand (deterministic: fixed seeds, CPU, float32):

    /work/golden-venv/bin/python tools/golden/llama_golden.py

For each case it writes crates/rustspeed-models/tests/golden/<case>/:
  config.json, model.safetensors   the tiny random model (transformers' save_pretrained, f32)
  golden.safetensors               input_ids, labels [B, T] (int64, HF unshifted, some -100),
                                   logits [B, T, V], loss [] (mean NLL as HF computes it) and
                                   grad.<name> for every parameter of named_parameters()
                                   (a tied lm_head appears once, as model.embed_tokens.weight).

Cases:
  llama         LlamaForCausalLM, GQA (4 heads / 2 kv heads), untied head
  llama3_rope   the same with rope_parameters {rope_type: llama3} (all three frequency bands hit)
  mistral       MistralForCausalLM, sliding_window 4 with T = 12, so the window matters
  qwen2         Qwen2ForCausalLM, q/k/v biases, tied embeddings; config.json rewritten in the
                older form (top-level rope_theta, torch_dtype) to exercise that parser path

Hidden size is 32 (not 64) so that each case directory stays under ~300 KB.

Every parameter is re-drawn after construction (weights N(0, 0.2), biases N(0, 0.1), norm
weights 1 + N(0, 0.1)): HF's own init zeroes biases and sets norms to 1, which would leave the
bias and norm paths untested.

The script also checks, and fails loudly otherwise, that the eager and sdpa attention
implementations agree for every case and that Mistral's sliding window changes the logits at
T = 12 (transformers 5 masks key j for query i unless i - W < j <= i, masking_utils'
sliding_window_overlay), so the golden really exercises the window.
"""

import json
import os

import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "..",
    "crates",
    "rustspeed-models",
    "tests",
    "golden",
)
B, T, V = 2, 12, 96

COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    attention_dropout=0.0,
    bos_token_id=1,
    eos_token_id=2,
)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    # Ignored labels: a masked prompt at the start of row 0, padding at the end of row 1.
    labels[0, :3] = -100
    labels[1, -4:] = -100
    return input_ids, labels


def run(model, input_ids, labels, impl):
    model.config._attn_implementation = impl
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    return out


def make_case(name, cls, config, seed, old_form_config=False):
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    randomize(model, seed)
    input_ids, labels = inputs(seed + 1)

    sdpa = run(model, input_ids, labels, "sdpa")
    out = run(model, input_ids, labels, "eager")
    out.loss.backward()
    diff = (sdpa.logits - out.logits).abs().max().item()
    assert diff < 1e-5, f"{name}: eager and sdpa logits differ by {diff}"

    if getattr(config, "sliding_window", None):
        window = config.sliding_window
        config.sliding_window = None
        full = run(model, input_ids, labels, "eager").logits
        config.sliding_window = window
        gap = (full - out.logits).abs().max().item()
        assert gap > 1e-3, f"{name}: sliding window {window} does not change the logits"
        print(f"{name}: sliding window changes logits by up to {gap:.4f}")
        model.zero_grad(set_to_none=True)
        out = run(model, input_ids, labels, "eager")
        out.loss.backward()

    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    if old_form_config:
        path = os.path.join(d, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        rope = cfg.pop("rope_parameters")
        assert rope.get("rope_type", "default") == "default", rope
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    tensors = {
        "input_ids": input_ids.contiguous(),
        "labels": labels.contiguous(),
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()),
    }
    for pname, p in model.named_parameters():
        tensors[f"grad.{pname}"] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(d, "golden.safetensors"))
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"{name}: loss {out.loss.item():.6f}, {len(tensors)} tensors, {size / 1024:.0f} KiB")


def main():
    torch.use_deterministic_algorithms(True)
    make_case(
        "llama",
        LlamaForCausalLM,
        LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
        seed=1000,
    )
    make_case(
        "llama3_rope",
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        seed=2000,
    )
    make_case(
        "mistral",
        MistralForCausalLM,
        MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=4, tie_word_embeddings=False),
        seed=3000,
    )
    make_case(
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(**COMMON, rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False),
        seed=4000,
        old_form_config=True,
    )


if __name__ == "__main__":
    main()
