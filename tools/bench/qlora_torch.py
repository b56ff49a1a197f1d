"""PyTorch + PEFT counterpart of crates/rustspeed/examples/bench_qlora.rs (docs/BENCHMARKS.md,
issue 7): the same TinyLlama-1.1B-shaped model with random weights, LoRA r=16 (alpha 32,
dropout 0.05) on all linears, gradient checkpointing, seq 512, micro-batch 1, AdamW lr 1e-4,
clipping 1.0. Prints one JSON line like the Rust example.

    python tools/bench/qlora_torch.py BASE [STEPS] [SEQ]

BASE: nf4 (bitsandbytes Linear4bit, double quant, bf16 compute; needs `pip install
bitsandbytes`, whose CPU backend runs without a GPU), bf16 | f32 (dense frozen base + LoRA),
full-bf16 | full-f32 (every parameter trains; bf16 here is pure bf16 weights and Adam state,
as a plain PyTorch user gets it, not DeepSpeed's fp32 master).

Peak RSS is VmHWM reset (/proc/self/clear_refs = 5) once the model is ready, so it is the
training peak; the model is built in bf16/f32 first and quantized in place for nf4, which a
from_pretrained load would avoid, so the setup peak is not reported.
"""

import json
import os
import sys
import time

import torch

THREADS = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(THREADS)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
    hidden_act="silu",
)


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def gib(b):
    return b / (1 << 30)


def quantize_linears(model):
    """Every nn.Linear inside the decoder layers becomes a bitsandbytes NF4 Linear4bit (double
    quant, bf16 compute), as BitsAndBytesConfig(load_in_4bit=True, ...) does on load."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data,
                        requires_grad=False,
                        compress_statistics=True,
                        quant_type="nf4",
                    )
                    setattr(parent, name, q.to("cpu"))
                    del child


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "nf4"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    seq = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    full = base.startswith("full-")
    dtype = torch.float32 if base.endswith("f32") else torch.bfloat16
    t0 = time.time()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).to(dtype)
    if base == "nf4":
        quantize_linears(model)
        # Hand the dense copy's pages back, so the RSS figures show the quantized model.
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if full:
        trainable = model
    else:
        from peft import LoraConfig, get_peft_model

        if base == "nf4":
            from peft import prepare_model_for_kbit_training

            # Only what the Rust run also does: frozen base, checkpointing; the fp32 upcast of
            # norms that prepare_model_for_kbit_training does by default is turned off.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=False
            )
            for p in model.parameters():
                if p.dtype == torch.float32 and p.dim() == 1:
                    p.data = p.data.to(torch.bfloat16)
        cfg = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
        trainable = model
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if not full:
        # The frozen embedding's output must require grad for checkpointed blocks to backprop.
        model.enable_input_require_grads()
    model.train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(42)
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (1, seq), generator=g)
    rss_ready = status("VmRSS:")
    setup_s = time.time() - t0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times, losses = [], []
    for step in range(steps):
        t = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        times.append(time.time() - t)
        losses.append(round(out.loss.item(), 6))
        print(
            f"{base}: step {step + 1} loss {losses[-1]:.4f} {times[-1]:.1f}s, "
            f"peak RSS {gib(status('VmHWM:')):.2f} GiB",
            file=sys.stderr,
        )
    steady = times[1:] if len(times) > 1 else times
    peak = status("VmHWM:")
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "torch": torch.__version__,
                "base": base,
                "tuning": "full" if full else "lora-r16-all-linear",
                "seq": seq,
                "steps": steps,
                "threads": THREADS,
                "trainable": n_train,
                "params": n_all,
                "setup_s": round(setup_s, 1),
                "step_s": round(sum(steady) / len(steady), 2),
                "step_times": [round(t, 2) for t in times],
                "losses": losses,
                "training_peak_rss_gib": round(gib(peak), 3),
                "rss_before_training_gib": round(gib(rss_ready), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
