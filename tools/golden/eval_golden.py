"""Reference losses for `rustspeed eval` (run by hand, deterministic).

Writes crates/rustspeed-cli/tests/golden/eval/: a tiny random GPT2LMHeadModel (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), data.jsonl, and expected.json with
the loss transformers gives under eval's definition: each text tokenized on its own
(add_special_tokens=True), truncated to max_length, total NLL of positions 1..n over the number
of predicted tokens of all texts. Recorded for the default max_length (n_positions) and 8.

Usage: /work/golden-venv/bin/python tools/golden/eval_golden.py
"""

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = Path(__file__).resolve().parents[2] / "crates/rustspeed-cli/tests/golden/eval"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
    "In 1911 the encyclopaedia had 29 volumes.",
    "a",
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))

    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(OUT))
    with (OUT / "data.jsonl").open("w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"id": i, "text": t}) + "\n")

    expected = {}
    for max_length in (cfg.n_positions, 8):
        nll, count = 0.0, 0
        for t in TEXTS:
            ids = tok.encode(t, add_special_tokens=True).ids[:max_length]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            with torch.no_grad():
                loss = model(input_ids=x, labels=x).loss.item()
            nll += loss * (len(ids) - 1)
            count += len(ids) - 1
        expected[str(max_length)] = {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1))
    print(expected)


if __name__ == "__main__":
    main()
