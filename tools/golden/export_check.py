#!/usr/bin/env python3
"""Evidence that transformers loads what rustspeed exports, unchanged. Run by hand:

    cargo test -p rustspeed-models --test export -- --ignored export_golden_models
    /work/golden-venv/bin/python tools/golden/export_check.py [EXPORT_DIR]

EXPORT_DIR (default $RUSTSPEED_EXPORT_DIR, else $TMPDIR/rustspeed-export) holds the golden tiny
models of crates/rustspeed-models/tests/golden re-exported by rustspeed's save_pretrained. Each
is loaded with AutoModelForCausalLM.from_pretrained, without options beyond eager attention,
and compared with the original directory loaded the same way:
  * the parameters: equal to the original's loaded in the exported dtype (bit for bit);
  * the dtype transformers picked from config.json (`dtype="auto"`) is the exported one;
  * the logits on fixed input ids: bit-equal to the original's loaded in the same dtype.
Exits non-zero on any mismatch.
"""

import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "..", "..", "crates", "rustspeed-models", "tests", "golden")
CASES = {  # exported directory -> (source golden, dtype)
    "gpt2_f32": ("gpt2", torch.float32),
    "gpt2_bf16": ("gpt2", torch.bfloat16),
    "llama_f32_sharded": ("llama", torch.float32),
    "llama_bf16": ("llama", torch.bfloat16),
    "mistral_f32": ("mistral", torch.float32),
    "qwen2_f32": ("qwen2", torch.float32),
}


def load(path, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


def check(root, name, source, dtype):
    exported = os.path.join(root, name)
    if not os.path.isdir(exported):
        return [f"{exported}: missing (run the ignored export_golden_models test first)"]
    errors = []
    ours = load(exported, "auto")
    if ours.dtype != dtype:
        errors.append(f"dtype from config.json is {ours.dtype}, exported as {dtype}")
    # from_pretrained(dtype=...) rather than .to(dtype): .to would also cast buffers such as
    # LLaMA's rotary inv_freq, which transformers keeps in f32 when it loads a bf16 model.
    ref = load(os.path.join(GOLDEN, source), dtype)

    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    if sorted(ours_sd) != sorted(ref_sd):
        errors.append(f"parameter names differ: {sorted(set(ours_sd) ^ set(ref_sd))}")
    for key in sorted(set(ours_sd) & set(ref_sd)):
        if not torch.equal(ours_sd[key], ref_sd[key]):
            diff = (ours_sd[key].float() - ref_sd[key].float()).abs().max().item()
            errors.append(f"`{key}` differs (max |diff| {diff:e})")

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        want = ref(input_ids=ids).logits
    diff = (got.float() - want.float()).abs().max().item()
    if not torch.equal(got, want):
        errors.append(f"logits differ: max |diff| {diff:e}")
    print(f"{name:20} {str(dtype):15} params {len(ours_sd):3}  logits max|diff| {diff:.1e}  "
          f"{'ok' if not errors else 'FAILED'}")
    return errors


def main():
    root = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("RUSTSPEED_EXPORT_DIR")
            or os.path.join(tempfile.gettempdir(), "rustspeed-export"))
    torch.manual_seed(0)
    failed = False
    for name, (source, dtype) in CASES.items():
        for e in check(root, name, source, dtype):
            print(f"  {name}: {e}")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
