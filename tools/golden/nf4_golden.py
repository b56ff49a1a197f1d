"""Reference values for rustspeed's bitsandbytes-compatible weight quantization (run by hand).

bitsandbytes' 4-bit kernels are CUDA, so this script re-implements their rules in numpy,
scalar by scalar, from bitsandbytes-foundation/bitsandbytes at commit 95f9af3 (0.50.x):

  csrc/kernels.cu
    L26-43    nf4_dequantization_lut        NF4 code book (= functional.get_4bit_type("nf4"))
    L15-24    fp4_dequantization_lut        FP4 magnitudes; L59-62 dDequantizeFP4Tree adds the sign
    L64-106   dQuantizeFP4                  sign bit, then a threshold tree on |x|, strict `>`
    L110-157  dQuantizeNF4                  threshold tree on x, strict `>` (a tie goes low)
    L160-220  dQuantize<0>                  8-bit: binary search in the 256-entry code, then the
                                            nearer neighbour by f32 midpoints (tie: see code)
    L271-385  kQuantizeBlockwise            absmax = max |x| of the block's valid items, the
    L389-463  kQuantizeBlockwiseSmall       block scaled by x * (1.0f / absmax) (a product, not
                                            a division), missing items of the last block loaded
                                            as 0; two values per byte, the first (even index)
                                            in the HIGH nibble (L364-365: `q(v[2j]) << 4 | q(v[2j+1])`)
    L466-527  kDequantizeBlockwise          out = T(code[q] * absmax) in f32, rounded once to T
  bitsandbytes/functional.py
    L296-345  create_dynamic_map            the signed 8-bit dynamic map (computed with torch,
                                            exactly as bitsandbytes does, below)
    L938-940  quantize_4bit(compress_statistics=True): offset = absmax.mean();
              quantize_blockwise(absmax - offset, blocksize=256) with the dynamic map
    L1050-1054 dequantize_4bit: absmax = dequantize_blockwise(qabsmax, state2) + offset (f32)
  bitsandbytes/backends/default/ops.py L143-178 int8_vectorwise_quant (threshold 0):
              row_stats = max |row| (f32), q = round_half_even(A * (127 / row_stats)) -> int8
  bitsandbytes/_ops.py L118-121 int8_vectorwise_dequant: A * stats * 7.874015718698502e-3

The mean for the double-quant offset is taken in f64 and rounded to f32 (torch's f32 `mean`
sums in a device-dependent order, so bitsandbytes itself is only reproducible to an ulp there).

If bitsandbytes is importable (`pip install --target DIR bitsandbytes` then PYTHONPATH=DIR; its
CPU build runs its pure-PyTorch reference backend for 4-bit), the script also cross-checks
the numpy reference against it on every case and prints where the two differ.

Writes crates/rustspeed-kernels/tests/golden/quant.json. Every float array is one string of the
hex of its IEEE bits (f32: 8 digits per value, bf16: 4), byte arrays plain hex, so the Rust test
compares exactly.

Usage: /work/golden-venv/bin/python tools/golden/nf4_golden.py
"""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[2] / "crates/rustspeed-kernels/tests/golden/quant.json"
f32 = np.float32


def lit(text):
    """A C float literal (`0.86147841f`): the f32 nearest the decimal, ties to even. Going
    through f64 first (np.float32(0.8614784181118011)) rounds twice and is off by an ulp for
    some of bitsandbytes' thresholds, which changes which values tie."""
    exact = Fraction(text)
    near = f32(float(exact))
    cands = [np.nextafter(near, f32(-np.inf), dtype=f32), near,
             np.nextafter(near, f32(np.inf), dtype=f32)]
    dist = [abs(Fraction(float(c)) - exact) for c in cands]
    best = min(dist)
    ties = [c for c, d in zip(cands, dist) if d == best]
    return min(ties, key=lambda c: int(c.view(np.uint32)) & 1)


# kernels.cu L26-43.
NF4 = np.array([lit(v) for v in [
    "-1.0", "-0.6961928009986877", "-0.5250730514526367", "-0.39491748809814453",
    "-0.28444138169288635", "-0.18477343022823334", "-0.09105003625154495", "0.0",
    "0.07958029955625534", "0.16093020141124725", "0.24611230194568634", "0.33791524171829224",
    "0.44070982933044434", "0.5626170039176941", "0.7229568362236023", "1.0"]], dtype=f32)
# kernels.cu L15-24 (index = the three low bits), L59-62: bit 3 is the sign.
FP4_MAG = np.array(
    [lit(v) for v in ["0.0", "0.005208333333", "0.66666667", "1.0", "0.33333333", "0.5",
                      "0.16666667", "0.25"]], dtype=f32
)
FP4 = np.array([-FP4_MAG[i & 7] if i & 8 else FP4_MAG[i & 7] for i in range(16)], dtype=f32)


def q_nf4(x):
    """dQuantizeNF4, kernels.cu L110-157, transcribed branch by branch (x is f32)."""
    x = f32(x)
    if x > lit("0.03979014977812767"):
        if x > lit("0.3893125355243683"):
            if x > lit("0.6427869200706482"):
                return 0b1111 if x > lit("0.8614784181118011") else 0b1110
            return 0b1101 if x > lit("0.5016634166240692") else 0b1100
        if x > lit("0.2035212516784668"):
            return 0b1011 if x > lit("0.2920137718319893") else 0b1010
        return 0b1001 if x > lit("0.1202552504837513") else 0b1000
    if x > lit("-0.33967943489551544"):
        if x > lit("-0.13791173323988914"):
            return 0b0111 if x > lit("-0.045525018125772476") else 0b0110
        return 0b0101 if x > lit("-0.23460740596055984") else 0b0100
    if x > lit("-0.6106329262256622"):
        return 0b0011 if x > lit("-0.4599952697753906") else 0b0010
    return 0b0001 if x > lit("-0.8480964004993439") else 0b0000


def q_fp4(x):
    """dQuantizeFP4, kernels.cu L64-106."""
    x = f32(x)
    sign = 0b1000 if x < 0 else 0
    x = abs(x)
    if x > lit("0.29166667"):
        if x > lit("0.583333"):
            return (0b0011 if x > lit("0.8333333") else 0b0010) + sign
        return (0b101 if x > lit("0.4166667") else 0b100) + sign
    if x > lit("0.0859375"):
        return (0b0111 if x > lit("0.20833333") else 0b0110) + sign
    return (0b0001 if x > lit("0.00260417") else 0b0000) + sign


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """functional.py L296-345, the same torch calls (torch.linspace's rounding is part of the
    map: its vectorised CPU kernel gives a few entries an ulp off the scalar formula)."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1,
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    assert additional_items == 0
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data.sort()
    return np.array(data, dtype=f32)


def q_dynamic(code, x):
    """dQuantize<0>, kernels.cu L160-220 (pivot arithmetic and comparisons as written)."""
    x = f32(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        midpoint = (upper + val) * f32(0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = (lower + val) * f32(0.5)
    return lower_pivot if x < midpoint else pivot


def blockwise_absmax_scaled(a, blocksize):
    """kQuantizeBlockwise's scaling: per block absmax (f32) and x * (1.0f / absmax) per item.
    Items past the end are loaded as 0 (they only matter for an odd 4-bit count)."""
    n = len(a)
    nblocks = (n + blocksize - 1) // blocksize
    absmax = np.zeros(nblocks, dtype=f32)
    scaled = np.zeros(nblocks * blocksize, dtype=f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for b in range(nblocks):
            blk = a[b * blocksize : (b + 1) * blocksize]
            m = f32(np.max(np.abs(blk)))
            absmax[b] = m
            inv = f32(1.0) / m  # inf for an all-zero block: 0 * inf = NaN, as on the GPU
            padded = np.zeros(blocksize, dtype=f32)
            padded[: len(blk)] = blk
            scaled[b * blocksize : (b + 1) * blocksize] = padded * inv
    return absmax, scaled


def quantize_blockwise_8bit(a, code, blocksize):
    absmax, scaled = blockwise_absmax_scaled(a, blocksize)
    q = np.array([q_dynamic(code, x) for x in scaled[: len(a)]], dtype=np.uint8)
    return q, absmax


def dequantize_blockwise_8bit(q, absmax, code, blocksize):
    return np.array(
        [code[q[i]] * absmax[i // blocksize] for i in range(len(q))], dtype=f32
    )


def quantize_4bit(a, fmt, blocksize, double_quant, code8):
    n = len(a)
    absmax, scaled = blockwise_absmax_scaled(a, blocksize)
    qf = q_nf4 if fmt == "nf4" else q_fp4
    nib = [qf(scaled[i]) for i in range((n + 1) // 2 * 2)]  # the odd tail's partner is 0 * inv
    packed = np.array([(nib[2 * j] << 4) | nib[2 * j + 1] for j in range(len(nib) // 2)], np.uint8)
    out = {"packed": packed, "absmax": absmax}
    if double_quant:
        offset = f32(absmax.astype(np.float64).mean())
        centred = (absmax - offset).astype(f32)
        qabs, absmax2 = quantize_blockwise_8bit(centred, code8, 256)
        deq = (dequantize_blockwise_8bit(qabs, absmax2, code8, 256) + offset).astype(f32)
        out.update(qabsmax=qabs, absmax2=absmax2, offset=offset, absmax_dequant=deq)
    return out


def dequantize_4bit(packed, absmax, n, fmt):
    code = NF4 if fmt == "nf4" else FP4
    nib = np.empty(len(packed) * 2, dtype=np.uint8)
    nib[0::2] = packed >> 4
    nib[1::2] = packed & 0xF
    return np.array([code[nib[i]] * absmax[i // BLOCK_OF[0]] for i in range(n)], dtype=f32)


BLOCK_OF = [64]  # set per case before dequantize_4bit (keeps the signature close to bnb's)


def quantize_int8(w):
    """default/ops.py int8_vectorwise_quant with threshold 0 (no outlier columns)."""
    stats = np.max(np.abs(w), axis=1).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (f32(127.0) / stats).astype(f32)
        prod = (w * scale[:, None]).astype(f32)
    # An all-zero row gives 0 * inf = NaN, whose int8 cast is undefined in torch; rustspeed
    # stores 0 there (and so does this reference).
    q = np.where(np.isnan(prod), f32(0), np.round(prod)).astype(np.int8)  # np.round: half-even
    deq = ((q.astype(f32) * stats[:, None]).astype(f32) * f32(7.874015718698502e-3)).astype(f32)
    return q, stats, deq


# ---- deterministic inputs, reproduced bit for bit by the Rust test ------------------------


class SplitMix:
    """splitmix64, as crates/rustspeed-kernels/src/testing.rs."""

    M = (1 << 64) - 1

    def __init__(self, seed):
        self.s = seed

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & self.M
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.M
        return z ^ (z >> 31)

    def uniform(self):
        # Exact in f32 and f64 alike: a 24-bit integer over 2^24, times 2, minus 1.
        return (self.next_u64() >> 40) / float(1 << 24) * 2.0 - 1.0


def gen_weights(seed, rows, cols):
    """Bell-shaped values (sum of four uniforms, in f64, rounded once to f32), a different
    scale per row, every 97th value an 8x outlier: varied absmax and all 16 codes in use."""
    r = SplitMix(seed)
    out = np.empty(rows * cols, dtype=f32)
    for i in range(rows * cols):
        s = r.uniform() + r.uniform() + r.uniform() + r.uniform()
        row_scale = 0.02 * (1 + (i // cols) % 5)
        v = f32(s * 0.5 * row_scale)
        out[i] = v * f32(8.0) if i % 97 == 0 else v
    return out


def to_bf16_bits(a):
    """Round-to-nearest-even f32 -> bf16 (no NaNs here), as half::bf16::from_f32."""
    b = a.astype(f32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(f32)


def hx32(a):
    """f32 values as one string of 8-hex-digit bit patterns (big-endian digits per value)."""
    return "".join(f"{int(v):08x}" for v in np.asarray(a, dtype=f32).reshape(-1).view(np.uint32))


def hx16(a):
    return "".join(f"{int(v):04x}" for v in np.asarray(a, dtype=np.uint16).reshape(-1))


def hexbytes(a):
    return bytes(np.asarray(a, dtype=np.uint8)).hex()


def next_up(x):
    return np.nextafter(f32(x), f32(np.inf), dtype=f32)


def next_down(x):
    return np.nextafter(f32(x), f32(-np.inf), dtype=f32)


def tie_blocks(thresholds):
    """Blocks of 64 whose absmax is exactly 1 (so the scale is 1 and x * 1 = x) holding every
    threshold, its negation and their f32 neighbours on both sides, and zeros of both signs."""
    vals = []
    for t in thresholds:
        for s in [lit(t), -lit(t)]:
            vals += [s, next_up(s), next_down(s)]
    vals += [f32(0.0), f32(-0.0)]
    blocks = []
    for i in range(0, len(vals), 63):
        blk = [f32(1.0)] + vals[i : i + 63]
        blocks.append(np.array(blk + [f32(0.0)] * (64 - len(blk)), dtype=f32))
    return np.concatenate(blocks)


NF4_T = ["0.03979014977812767", "0.3893125355243683", "0.6427869200706482", "0.8614784181118011",
         "0.5016634166240692", "0.2035212516784668", "0.2920137718319893", "0.1202552504837513",
         "-0.33967943489551544", "-0.13791173323988914", "-0.045525018125772476",
         "-0.23460740596055984", "-0.6106329262256622", "-0.4599952697753906",
         "-0.8480964004993439"]
FP4_T = ["0.29166667", "0.583333", "0.8333333", "0.4166667", "0.0859375", "0.20833333",
         "0.00260417"]


def four_bit_case(name, fmt, rows, cols, blocksize, dq, code8, values, input_dtype,
                  store_input, dequant_every=1, seed=None):
    if input_dtype == "bf16":
        bits = to_bf16_bits(values)
        a = bf16_bits_to_f32(bits)
    else:
        a = values.astype(f32)
    q = quantize_4bit(a, fmt, blocksize, dq, code8)
    absmax = q["absmax_dequant"] if dq else q["absmax"]
    BLOCK_OF[0] = blocksize
    deq = dequantize_4bit(q["packed"], absmax, len(a), fmt)
    idx = list(range(0, len(a), dequant_every))
    case = {
        "name": name, "format": fmt, "out_features": rows, "in_features": cols,
        "block_size": blocksize, "double_quant": dq, "input_dtype": input_dtype,
        "packed": hexbytes(q["packed"]),
        "absmax": hx32(q["absmax"]),
        "dequant_index_step": dequant_every,
        "dequant_f32": hx32(deq[idx]),
        "dequant_bf16": hx16(to_bf16_bits(deq[idx])),
    }
    if store_input:
        case["input"] = hx16(bits) if input_dtype == "bf16" else hx32(a)
    else:
        case["input_seed"] = seed  # regenerate with gen_weights(seed, rows, cols)
    if dq:
        case.update(qabsmax=hexbytes(q["qabsmax"]), absmax2=hx32(q["absmax2"]),
                    offset=hx32([q["offset"]]), absmax_dequant=hx32(q["absmax_dequant"]))
    return case, a, q


def int8_case(name, rows, cols, values, input_dtype, store_input):
    if input_dtype == "bf16":
        bits = to_bf16_bits(values)
        a = bf16_bits_to_f32(bits)
    else:
        a = values.astype(f32)
    q, stats, deq = quantize_int8(a.reshape(rows, cols))
    case = {
        "name": name, "format": "int8", "out_features": rows, "in_features": cols,
        "input_dtype": input_dtype, "q": hexbytes(q.view(np.uint8).reshape(-1)),
        "row_absmax": hx32(stats), "dequant_index_step": 1,
        "dequant_f32": hx32(deq.reshape(-1)), "dequant_bf16": hx16(to_bf16_bits(deq.reshape(-1))),
    }
    if store_input:
        case["input"] = hx16(bits) if input_dtype == "bf16" else hx32(a)
    return case, a, (q, stats, deq)


def cross_check(cases_raw, code8):
    try:
        import bitsandbytes.functional as F
        from bitsandbytes.functional import create_dynamic_map as bnb_dynamic_map
    except ImportError:
        print("bitsandbytes not importable: skipped the cross-check")
        return
    same_map = np.array_equal(bnb_dynamic_map().numpy(), code8)
    print(f"cross-check: dynamic map identical to bitsandbytes': {same_map}")
    for case, a, q in cases_raw:
        t = torch.from_numpy(a.copy()).reshape(case["out_features"], case["in_features"])
        if case["format"] == "int8":
            cb, stats, _ = F.int8_vectorwise_quant(t.clone())
            ok = np.array_equal(stats.numpy(), q[1])
            nz = q[1] != 0  # rows that are not all zero (see quantize_int8)
            ok &= np.array_equal(cb.numpy()[nz], q[0][nz])
            deq = F.int8_vectorwise_dequant(cb, stats).numpy()
            ok &= np.array_equal(deq[nz], q[2][nz])
            print(f"cross-check {case['name']}: q, row_absmax, dequant identical: {ok}")
            continue
        packed, st = F.quantize_4bit(t, blocksize=case["block_size"], quant_type=case["format"],
                                     compress_statistics=case["double_quant"])
        packed = packed.reshape(-1).numpy()
        code = NF4 if case["format"] == "nf4" else FP4
        ours = np.stack([q["packed"] >> 4, q["packed"] & 15], 1).reshape(-1)[: len(a)]
        theirs = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[: len(a)]
        diff = np.nonzero(ours != theirs)[0]
        # Codes of equal value (FP4's +0 / -0) are interchangeable; anything else is a real
        # difference, expected only where bitsandbytes' CPU backend departs from its CUDA
        # kernels: exact threshold ties (f32 midpoints vs the CUDA literals) and all-zero NF4
        # blocks (CUDA: 0 * (1/0) = NaN -> code 0, i.e. -1.0 * 0).
        real = [i for i in diff if code[ours[i]] != code[theirs[i]]]
        if case["double_quant"]:
            theirs_abs = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).numpy()
            same_abs = np.array_equal(theirs_abs, q["absmax_dequant"])
            extra = (f", offset equal: {st.offset.item() == float(q['offset'])}, qabsmax codes"
                     f" differing: {int(np.sum(st.absmax.numpy() != q['qabsmax']))}")
        else:
            same_abs = np.array_equal(st.absmax.numpy(), q["absmax"])
            extra = ""
        print(f"cross-check {case['name']}: absmax identical: {same_abs}{extra}; 4-bit codes"
              f" differing: {len(diff)}, of which with a different value: {len(real)}"
              + (f" (at scaled values {[float(a[i]) for i in real[:4]]}...)" if real else ""))


def main():
    # torch.linspace's vectorised kernels (AVX2, AVX512: what any x86 GPU host runs) round a
    # few map entries differently from its scalar fallback; the map must be the former.
    cap = torch.backends.cpu.get_cpu_capability()
    assert cap in ("AVX2", "AVX512"), f"run on an AVX2/AVX512 CPU build of torch, got {cap}"
    code8 = create_dynamic_map()
    cases, raw = [], []

    def add(res):
        case, a, q = res
        cases.append(case)
        raw.append((case, a, q))

    for fmt in ["nf4", "fp4"]:
        add(four_bit_case(f"{fmt}_5x64", fmt, 5, 64, 64, False, code8,
                          gen_weights(1, 5, 64), "f32", True))
        # Rows of 70 straddle block boundaries; one nested block, partly filled.
        add(four_bit_case(f"{fmt}_3x70_dq", fmt, 3, 70, 64, True, code8,
                          gen_weights(2, 3, 70), "f32", True))
        # 63 values: an odd count, the last byte's low nibble is the padding 0 * scale.
        add(four_bit_case(f"{fmt}_7x9", fmt, 7, 9, 64, False, code8,
                          gen_weights(3, 7, 9), "f32", True))
        add(four_bit_case(f"{fmt}_4x96_bf16_dq", fmt, 4, 96, 64, True, code8,
                          gen_weights(4, 4, 96), "bf16", True))
        add(four_bit_case(f"{fmt}_2x100_block32", fmt, 2, 100, 32, False, code8,
                          gen_weights(5, 2, 100), "f32", True))
        # Ties: thresholds and their neighbours; an all-zero block; a block whose absmax is a
        # negative value.
        ties = tie_blocks(NF4_T if fmt == "nf4" else FP4_T)
        zero = np.zeros(64, dtype=f32)
        neg = np.zeros(64, dtype=f32)
        neg[5], neg[6], neg[7] = f32(-2.5), f32(1.25), f32(-0.1)
        vals = np.concatenate([ties, zero, neg])
        add(four_bit_case(f"{fmt}_ties", fmt, len(vals) // 64, 64, 64, False, code8,
                          vals, "f32", True))
        # 265 blocks: two nested blocks of 256, the second partial. Inputs regenerated by the
        # Rust test from the seed; dequantized values stored for every 13th element.
        add(four_bit_case(f"{fmt}_130x130_dq", fmt, 130, 130, 64, True, code8,
                          gen_weights(6, 130, 130), "f32", False, dequant_every=13, seed=6))

    add(int8_case("int8_5x70", 5, 70, gen_weights(7, 5, 70), "f32", True))
    add(int8_case("int8_3x40_bf16", 3, 40, gen_weights(8, 3, 40), "bf16", True))
    # Scale exactly 1 (absmax 127): .5 ties round to even; a zero row.
    ties8 = np.array([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5, 0.49999997]
                     + [0.0] * 5, dtype=f32)
    add(int8_case("int8_ties", 2, 16, np.concatenate([ties8, np.zeros(16, f32)]), "f32", True))

    # 8-bit dynamic quantization on its own: every midpoint between neighbouring codes and its
    # f32 neighbours, in one block of absmax 1 (bitsandbytes' quantize_blockwise rules).
    mids = (code8[:-1] + code8[1:]) * f32(0.5)
    probe = np.concatenate([[f32(1.0)], mids, [next_up(m) for m in mids],
                            [next_down(m) for m in mids], code8]).astype(f32)
    q8, am8 = quantize_blockwise_8bit(probe, code8, len(probe) + (-len(probe)) % 256)
    dyn = {"input": hx32(probe), "block_size": int(len(probe) + (-len(probe)) % 256),
           "codes": hexbytes(q8), "absmax": hx32(am8)}

    gen_check = {"seed": 1, "rows": 2, "cols": 3, "values": hx32(gen_weights(1, 2, 3))}
    golden = {
        "source": "tools/golden/nf4_golden.py (numpy transcription of bitsandbytes 95f9af3)",
        "nf4_code": hx32(NF4), "fp4_code": hx32(FP4), "dynamic_map": hx32(code8),
        "generator_check": gen_check, "dynamic_quantize": dyn, "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")
    cross_check(raw, code8)


if __name__ == "__main__":
    main()
