#!/usr/bin/env python3
"""PyTorch side of the GPT-2 forward+backward benchmark (run by tools/bench/gpt2_step.sh).

Builds a randomly initialised GPT2LMHeadModel of the given shape (dropout off, eager attention),
times forward and backward of one micro-batch, and prints one JSON line:
{"impl": "pytorch", "model": ..., "dtype": ..., "B": .., "T": .., "forward_s": median,
 "backward_s": median, "step_s": median, "tokens_per_s": ..}
"""
import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {
    "124m": dict(n_embd=768, n_layer=12, n_head=12),
    "23m": dict(n_embd=384, n_layer=4, n_head=6),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=SHAPES, default="124m")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, **SHAPES[args.model])
    model = GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    fwd, bwd = [], []
    for i in range(args.steps + 1):
        model.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i > 0:  # the first step warms up allocators and kernels
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    f, b = statistics.median(fwd), statistics.median(bwd)
    print(json.dumps({
        "impl": "pytorch", "version": torch.__version__, "model": args.model,
        "dtype": args.dtype, "B": args.batch, "T": args.seq, "threads": args.threads,
        "forward_s": round(f, 4), "backward_s": round(b, 4), "step_s": round(f + b, 4),
        "tokens_per_s": round(args.batch * args.seq / (f + b), 1),
    }))


if __name__ == "__main__":
    main()
