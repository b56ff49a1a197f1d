"""By-hand cross-check of `rustspeed eval` on the real SmolLM2-135M-Instruct GGUF (not CI).

transformers loads the same GGUF (dequantizing it, via the `gguf` package) and scores the same
JSONL under eval's definition (each text alone, add_special_tokens=True, truncated to
max_length; total NLL / predicted tokens).

Usage: /work/golden-venv/bin/python tools/golden/smollm2_eval_reference.py MODEL.gguf DATA.jsonl [MAX_LENGTH]
"""

import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    gguf = Path(sys.argv[1])
    data = Path(sys.argv[2])
    max_length = int(sys.argv[3]) if len(sys.argv) > 3 else None
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    max_length = max_length or model.config.max_position_embeddings
    nll, count = 0.0, 0
    for line in data.read_text().splitlines():
        if not line.strip():
            continue
        ids = tok(json.loads(line)["text"], add_special_tokens=True)["input_ids"][:max_length]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = model(input_ids=x, labels=x).loss.item()
        nll += loss * (len(ids) - 1)
        count += len(ids) - 1
    print(json.dumps({"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}))


if __name__ == "__main__":
    main()
