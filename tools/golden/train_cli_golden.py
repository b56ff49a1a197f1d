#!/usr/bin/env python3
"""Goldens for `rustspeed train` (run by hand, deterministic):

    /work/golden-venv/bin/python tools/golden/train_cli_golden.py

Writes crates/rustspeed-cli/tests/golden/train/:
  model/            a tiny random GPT2LMHeadModel without dropout, with a byte-level BPE
                    tokenizer (tokenizer.json) whose tokenizer_config.json carries a ChatML chat
                    template with {% generation %} blocks
  text.jsonl        texts for the packing path
  text_expected.json  PyTorch's training run on the packed text, HF Trainer style: per-step
                    losses (mean of the micro-batch means), grad norms (global L2 before
                    clipping) and lrs; see train_text() for every rule followed
  alpaca.jsonl / alpaca.csv / alpaca.parquet   the same records (parquet written by pyarrow)
  alpaca_expected.json  input_ids and labels per record, stanford_alpaca's rule with
                    transformers' tokenizer
  chat.jsonl, chat_expected.json  input_ids and labels per conversation from
                    transformers' apply_chat_template(..., return_assistant_tokens_mask=True)
"""

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, get_scheduler

OUT = Path(__file__).resolve().parents[2] / "crates/rustspeed-cli/tests/golden/train"

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial zebras and brave knights sing old songs of far lands").split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, exactly (no newline after "### Response:").
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)

# The text run: flags of the rustspeed command and the values they stand for.
TEXT_RUN = {"micro": 2, "gas": 2, "lr": 1e-3, "weight_decay": 0.01, "max_grad_norm": 1.0,
            "warmup_steps": 2, "max_steps": 6, "block_size": 16}


def texts():
    out = []
    for i in range(30):
        n = 5 + (i * 7) % 11
        out.append(" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(n)) + ".")
    return out


def build_tokenizer(corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def write_model(corpus):
    d = OUT / "model"
    d.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return PreTrainedTokenizerFast.from_pretrained(str(d))


def hf_decay_groups(model, wd):
    # HF Trainer.get_decay_parameter_names: no decay for biases and LayerNorm weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or ".ln_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def train_text(tok, corpus):
    """The packing path through HF Trainer's defaults for a DeepSpeed config without optimizer and
    scheduler blocks: torch AdamW (betas 0.9/0.999, eps 1e-8) with HF's decay groups, the linear
    schedule with warmup, clipping to max_grad_norm, no shuffling (the rustspeed run uses
    --no-shuffle). Packing: each text tokenized with special tokens, EOS appended unless already
    last, concatenated, cut into blocks, remainder dropped. A step's loss is the mean of its
    micro-batch losses (each the mean NLL over the micro-batch's labels)."""
    r = TEXT_RUN
    stream = []
    for t in corpus:
        ids = tok(t)["input_ids"]
        if not ids or ids[-1] != tok.eos_token_id:
            ids = ids + [tok.eos_token_id]
        stream += ids
    n = len(stream) // r["block_size"] * r["block_size"]
    blocks = torch.tensor(stream[:n]).view(-1, r["block_size"])
    model = GPT2LMHeadModel.from_pretrained(str(OUT / "model")).train()
    opt = torch.optim.AdamW(hf_decay_groups(model, r["weight_decay"]), lr=r["lr"], betas=(0.9, 0.999),
                            eps=1e-8, foreach=False)
    sched = get_scheduler("linear", opt, num_warmup_steps=r["warmup_steps"], num_training_steps=r["max_steps"])
    global_batch = r["micro"] * r["gas"]
    steps, pos = [], 0
    for step in range(r["max_steps"]):
        if pos >= len(blocks):
            pos = 0
        batch = blocks[pos:pos + global_batch]
        pos += global_batch
        micro = list(batch.split(r["micro"]))
        lr = opt.param_groups[0]["lr"]
        total = 0.0
        for mb in micro:
            loss = model(input_ids=mb, labels=mb).loss
            (loss / len(micro)).backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r["max_grad_norm"]).item()
        opt.step()
        sched.step()
        opt.zero_grad()
        steps.append({"step": step + 1, "loss": total / len(micro), "grad_norm": norm, "lr": lr,
                      "tokens": int(batch.numel())})
    (OUT / "text_expected.json").write_text(json.dumps({"run": r, "num_blocks": len(blocks), "steps": steps}, indent=1))
    with (OUT / "text.jsonl").open("w") as f:
        for t in corpus:
            f.write(json.dumps({"text": t}) + "\n")
    return steps


def alpaca(tok):
    rows = []
    for i in range(8):
        instr = "Say " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3 + i % 3)) + "."
        inp = "" if i % 2 else " ".join(WORDS[(i + j * 5) % len(WORDS)] for j in range(2 + i % 4))
        out = " ".join(WORDS[(i * 7 + j * 2) % len(WORDS)] for j in range(4 + i % 5)) + "."
        rows.append({"instruction": instr, "input": inp, "output": out})
    expected = []
    for r in rows:
        prompt = (ALPACA_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r)
        # stanford_alpaca: mask as many leading tokens as the prompt alone tokenizes to; the EOS
        # id ends the sample.
        plen = len(tok(prompt)["input_ids"])
        ids = tok(prompt + r["output"])["input_ids"]
        if ids[-1] != tok.eos_token_id:
            ids.append(tok.eos_token_id)
        labels = [-100 if i < plen else t for i, t in enumerate(ids)]
        expected.append({"input_ids": ids, "labels": labels})
    with (OUT / "alpaca.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = pa.Table.from_pylist(rows)
    pacsv.write_csv(table, str(OUT / "alpaca.csv"))
    pq.write_table(table, str(OUT / "alpaca.parquet"))
    (OUT / "alpaca_expected.json").write_text(json.dumps(expected))


def chat(tok):
    convs = []
    for i in range(5):
        msgs = []
        if i % 2 == 0:
            msgs.append({"role": "system", "content": "Be brief and " + WORDS[i] + "."})
        for turn in range(1 + i % 3):
            msgs.append({"role": "user", "content": " ".join(WORDS[(i + turn + j * 4) % len(WORDS)] for j in range(3 + turn))})
            msgs.append({"role": "assistant", "content": " ".join(WORDS[(i * 2 + turn + j * 3) % len(WORDS)] for j in range(2 + i))})
        convs.append({"messages": msgs})
    expected = []
    for c in convs:
        enc = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = enc["input_ids"]
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])]
        expected.append({"input_ids": ids, "labels": labels})
    with (OUT / "chat.jsonl").open("w") as f:
        for c in convs:
            f.write(json.dumps(c) + "\n")
    (OUT / "chat_expected.json").write_text(json.dumps(expected))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = texts()
    extra = [CHAT_TEMPLATE, ALPACA_INPUT, ALPACA_NO_INPUT]
    tok = write_model(corpus + extra)
    steps = train_text(tok, corpus)
    alpaca(tok)
    chat(tok)
    for s in steps:
        print(s)


if __name__ == "__main__":
    main()
