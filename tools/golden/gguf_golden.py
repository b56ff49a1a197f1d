"""Reference GGUF files for rustspeed's GGUF reader (run by hand, deterministic).

Writes crates/rustspeed-models/tests/golden/gguf/:
  tensors.gguf    every metadata value type, custom alignment, F32/F16/BF16/Q8_0/Q4_0/Q4_1
                  tensors quantized by the `gguf` package's reference quantizers;
  tensors.json    the metadata values and each tensor's shape and dequantized values (from
                  gguf.quants.dequantize, the reference the Rust dequantizer must match);
  llama.gguf      a tiny random LlamaForCausalLM (GQA, tied embeddings) converted the way
                  llama.cpp's convert_hf_to_gguf does (q/k rows permuted for its RoPE), with an
                  embedded byte-level BPE tokenizer (`gpt2` model, `smollm` pre-tokenizer);
  llama.json      token ids the HF tokenizer gives for a few strings, and transformers' loss on
                  the dequantized weights for fixed inputs.

Usage: /work/golden-venv/bin/python tools/golden/gguf_golden.py
"""

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[2] / "crates/rustspeed-models/tests/golden/gguf"


def tensors_case(rng):
    path = OUT / "tensors.gguf"
    w = GGUFWriter(str(path), arch="test")
    w.add_custom_alignment(64)
    meta = {
        "t.u8": ("add_uint8", 200),
        "t.i8": ("add_int8", -100),
        "t.u16": ("add_uint16", 60000),
        "t.i16": ("add_int16", -30000),
        "t.u32": ("add_uint32", 4000000000),
        "t.i32": ("add_int32", -2000000000),
        "t.f32": ("add_float32", 1.5),
        "t.bool": ("add_bool", True),
        "t.string": ("add_string", "héllo"),
        "t.u64": ("add_uint64", 2**40 + 3),
        "t.i64": ("add_int64", -(2**40) - 3),
        "t.f64": ("add_float64", -2.25),
    }
    for key, (method, value) in meta.items():
        getattr(w, method)(key, value)
    w.add_array("t.array_i32", [1, -2, 3])
    w.add_array("t.array_str", ["a", "bc", ""])

    expected = {}

    def add(name, values, qtype):
        values = values.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, values)
        elif qtype == Q.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            packed = quantize(values, qtype)
            w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
            values = dequantize(packed, qtype)
        if qtype == Q.F16:
            values = values.astype(np.float16).astype(np.float32)
        expected[name] = {"shape": list(values.shape), "values": values.reshape(-1).tolist()}

    add("f32", rng.standard_normal((3, 5)), Q.F32)
    add("f16", rng.standard_normal((2, 8)), Q.F16)
    add("bf16", rng.standard_normal((2, 8)), Q.BF16)
    add("q8_0", rng.standard_normal((2, 64)), Q.Q8_0)
    add("q4_0", rng.standard_normal((2, 64)), Q.Q4_0)
    # A block with a large offset exercises Q4_1's minimum.
    add("q4_1", rng.standard_normal((3, 32)) + np.array([[0.0], [5.0], [-3.0]]), Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta_out = {k: v for k, (_, v) in meta.items()}
    meta_out["t.array_i32"] = [1, -2, 3]
    meta_out["t.array_str"] = ["a", "bc", ""]
    (OUT / "tensors.json").write_text(json.dumps({"metadata": meta_out, "tensors": expected}, indent=1))


def permute(w, n_head):
    # convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "To be, or not to be, that is the question: whether 'tis nobler in the mind",
        "In 1911 the encyclopaedia had 29 volumes and 40000 articles.",
        "Hello world! Hello there, hello again.",
    ]
    tok.train_from_iterator(corpus, trainer)
    return tok, specials


def llama_case():
    tok, specials = tiny_tokenizer()
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))

    path = OUT / "llama.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in specials else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    names = {
        "embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
        "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
        "up_proj": "ffn_up", "down_proj": "ffn_down",
    }
    # One tensor type per kind, so every dequantizer runs through the model.
    qtypes = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16,
              "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0, "token_embd": Q.Q8_0}
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        parts = name.split(".")
        if parts[1] == "layers":
            g = f"blk.{parts[2]}.{names[parts[-2]]}.{parts[-1]}"
        else:
            g = f"{names[parts[-2]]}.{parts[-1]}"
        kind = g.split(".")[-2]
        data = p.detach().numpy().astype(np.float32)
        if kind == "attn_q":
            data = permute(data, cfg.num_attention_heads)
        elif kind == "attn_k":
            data = permute(data, cfg.num_key_value_heads)
        qtype = qtypes.get(kind, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(g, data)
            back = data
        elif qtype == Q.F16:
            w.add_tensor(g, data.astype(np.float16))
            back = data.astype(np.float16).astype(np.float32)
        else:
            packed = quantize(data, qtype)
            w.add_tensor(g, packed, raw_shape=packed.shape, raw_dtype=qtype)
            back = dequantize(packed, qtype)
        # Undo the permutation so the HF model sees what rustspeed should load.
        n = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(kind)
        if n is not None:
            d = back.shape[0] // n
            back = back.reshape(n, d // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(back))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model.load_state_dict(state, strict=False)
    model.tie_weights()
    texts = ["Hello world! 123", "The quick brown fox jumps over the lazy dog.", "<|im_start|>To be"]
    ids = {t: tok.encode(t).ids for t in texts}
    inputs = torch.tensor([ids[texts[1]]])
    with torch.no_grad():
        out = model(input_ids=inputs, labels=inputs)
    (OUT / "llama.json").write_text(json.dumps({
        "encodings": ids,
        "loss_text": texts[1],
        "loss": out.loss.item(),
        "embed_sample": state["model.embed_tokens.weight"][3, :4].tolist(),
        "q_proj_0_row1": state["model.layers.0.self_attn.q_proj.weight"][1, :4].tolist(),
    }, indent=1))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tensors_case(np.random.default_rng(0))
    llama_case()
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
