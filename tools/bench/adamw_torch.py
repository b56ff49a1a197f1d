#!/usr/bin/env python3
"""torch AdamW (fused, foreach, default for-loop) and DeepSpeedCPUAdam on flat fp32 buffers.

The peer of `cargo run --release -p rustspeed-kernels --example bench_adamw`: same size,
same thread count, same warm-up and median, one JSON line per implementation, so both can be
run back to back on a quiet machine and compared in docs/BENCHMARKS.md.

Usage: python3 tools/bench/adamw_torch.py [--params 100000000] [--threads 2] [--steps 10]
Needs torch; DeepSpeedCPUAdam is measured only if `deepspeed` imports and its op builds.
"""

import argparse
import json
import statistics
import time


def bench(name, make_opt, params, grads, steps, threads, n):
    import torch

    opt = make_opt(params)
    for p, g in zip(params, grads):
        p.grad = g
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        opt.step()
        if i >= 2:  # warm-up: state allocation, page faults
            times.append(time.perf_counter() - t)
    t = statistics.median(times)
    print(json.dumps({
        "impl": name,
        "params": n,
        "threads": threads,
        "torch": torch.__version__,
        "median_s": round(t, 4),
        "gparams_per_s": round(n / t / 1e9, 3),
        "gb_per_s": round(28 * n / t / 1e9, 2),
    }), flush=True)
    del opt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=100_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    n = args.params
    hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def fresh():
        # One flat tensor, like rustspeed's flat buffer (and DeepSpeed's flattened groups).
        p = torch.full((n,), 0.5, dtype=torch.float32, requires_grad=True)
        g = torch.full((n,), 1e-3, dtype=torch.float32)
        return [p], [g]

    variants = [
        ("torch_adamw_fused", dict(fused=True)),
        ("torch_adamw_foreach", dict(foreach=True)),
        ("torch_adamw_default", dict(foreach=False)),
    ]
    for name, extra in variants:
        params, grads = fresh()
        try:
            bench(name, lambda ps: torch.optim.AdamW(ps, **hp, **extra), params, grads,
                  args.steps, args.threads, n)
        except (RuntimeError, TypeError) as e:  # fused CPU needs torch >= 2.4
            print(json.dumps({"impl": name, "error": str(e)}), flush=True)

    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # not installed, or the op cannot build here
        print(json.dumps({"impl": "deepspeed_cpu_adam", "error": f"import failed: {e}"}), flush=True)
        return
    params, grads = fresh()
    try:
        bench("deepspeed_cpu_adam", lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **hp), params,
              grads, args.steps, args.threads, n)
    except Exception as e:
        print(json.dumps({"impl": "deepspeed_cpu_adam", "error": str(e)}), flush=True)


if __name__ == "__main__":
    main()
