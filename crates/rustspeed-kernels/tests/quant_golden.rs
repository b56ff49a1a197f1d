//! rustspeed's NF4 / FP4 / int8 quantization against bitsandbytes' rules, bit for bit.
//!
//! tests/golden/quant.json comes from tools/golden/nf4_golden.py, a numpy transcription of
//! bitsandbytes' CUDA kernels (cross-checked there against bitsandbytes' own CPU build).
//! Packed bytes, absmax (plain and double-quantized), int8 codes and every dequantized value
//! must be identical; nothing here has a tolerance.

use half::bf16;
use rustspeed_kernels::quant::dynamic::{self, DYNAMIC_CODE};
use rustspeed_kernels::quant::fp4::FP4_CODE;
use rustspeed_kernels::quant::nf4::NF4_CODE;
use rustspeed_kernels::quant::{BlockScales, QuantConfig, QuantFormat, QuantMatrix};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/quant.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}; regenerate with tools/golden/nf4_golden.py"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("golden: missing string {key:?}"))
}

fn u(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("golden: missing integer {key:?}")) as usize
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_f32(h: &str) -> Vec<f32> {
    (0..h.len())
        .step_by(8)
        .map(|i| f32::from_bits(u32::from_str_radix(&h[i..i + 8], 16).unwrap()))
        .collect()
}

fn hex_bf16(h: &str) -> Vec<bf16> {
    (0..h.len())
        .step_by(4)
        .map(|i| bf16::from_bits(u16::from_str_radix(&h[i..i + 4], 16).unwrap()))
        .collect()
}

/// Bit patterns, so that -0.0 != 0.0 and the comparison is exact.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The script's `gen_weights`: splitmix64 uniforms (exact in f64), summed four at a time.
fn gen_weights(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
    };
    (0..rows * cols)
        .map(|i| {
            let s = uniform() + uniform() + uniform() + uniform();
            let row_scale = 0.02 * (1 + (i / cols) % 5) as f64;
            let v = (s * 0.5 * row_scale) as f32;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

#[test]
fn code_books_are_bitsandbytes() {
    let g = golden();
    assert_eq!(bits(&NF4_CODE), bits(&hex_f32(s(&g, "nf4_code"))));
    assert_eq!(bits(&FP4_CODE), bits(&hex_f32(s(&g, "fp4_code"))));
    assert_eq!(bits(&DYNAMIC_CODE), bits(&hex_f32(s(&g, "dynamic_map"))));
    let check = &g["generator_check"];
    let got = gen_weights(
        check["seed"].as_u64().unwrap(),
        u(check, "rows"),
        u(check, "cols"),
    );
    assert_eq!(
        bits(&got),
        bits(&hex_f32(s(check, "values"))),
        "test generator"
    );
}

#[test]
fn dynamic_8bit_quantization_ties_are_bitsandbytes() {
    let g = golden();
    let d = &g["dynamic_quantize"];
    let input = hex_f32(s(d, "input"));
    let (codes, absmax) = dynamic::quantize_blockwise(&input, u(d, "block_size"));
    assert_eq!(bits(&absmax), bits(&hex_f32(s(d, "absmax"))));
    let want = hex_bytes(s(d, "codes"));
    for (i, (c, w)) in codes.iter().zip(&want).enumerate() {
        assert_eq!(c, w, "value {:e} (input {i})", input[i]);
    }
}

/// A case's input matrix: stored bits, or regenerated from its seed.
enum Input {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

fn input(case: &Value) -> Input {
    let (rows, cols) = (u(case, "out_features"), u(case, "in_features"));
    if let Some(seed) = case["input_seed"].as_u64() {
        return Input::F32(gen_weights(seed, rows, cols));
    }
    match s(case, "input_dtype") {
        "bf16" => Input::Bf16(hex_bf16(s(case, "input"))),
        _ => Input::F32(hex_f32(s(case, "input"))),
    }
}

fn check_dequant(name: &str, q: &QuantMatrix, case: &Value) {
    let n = q.out_features * q.in_features;
    let step = u(case, "dequant_index_step");
    let mut d32 = vec![0f32; n];
    q.dequantize_into(&mut d32);
    let got: Vec<f32> = d32.iter().step_by(step).copied().collect();
    let want = hex_f32(s(case, "dequant_f32"));
    assert_eq!(got.len(), want.len(), "{name}: dequantized count");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{name}: dequant_f32[{}] {a} vs {b}",
            i * step
        );
    }
    let mut d16 = vec![bf16::ZERO; n];
    q.dequantize_into(&mut d16);
    let got: Vec<bf16> = d16.iter().step_by(step).copied().collect();
    let want = hex_bf16(s(case, "dequant_bf16"));
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{name}: dequant_bf16[{}]",
            i * step
        );
    }
}

#[test]
fn quantize_and_dequantize_equal_bitsandbytes() {
    let g = golden();
    let cases = g["cases"].as_array().expect("golden: cases");
    assert!(cases.len() >= 17);
    for case in cases {
        let name = s(case, "name");
        let (rows, cols) = (u(case, "out_features"), u(case, "in_features"));
        let format: QuantFormat = s(case, "format").parse().unwrap();
        let cfg = match format {
            QuantFormat::Int8 => QuantConfig::int8(),
            _ => QuantConfig {
                format,
                block_size: u(case, "block_size"),
                double_quant: case["double_quant"].as_bool().unwrap(),
                compute_dtype: None,
            },
        };
        let q = match input(case) {
            Input::F32(w) => QuantMatrix::quantize(&w, rows, cols, &cfg),
            Input::Bf16(w) => QuantMatrix::quantize(&w, rows, cols, &cfg),
        };
        if format == QuantFormat::Int8 {
            let (codes, absmax) = q.int8_parts().unwrap();
            let codes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
            assert_eq!(codes, hex_bytes(s(case, "q")), "{name}: int8 codes");
            assert_eq!(
                bits(absmax),
                bits(&hex_f32(s(case, "row_absmax"))),
                "{name}"
            );
        } else {
            let (packed, scales) = q.four_bit_parts().unwrap();
            let want = hex_bytes(s(case, "packed"));
            assert_eq!(packed.len(), want.len(), "{name}: packed length");
            for (i, (a, b)) in packed.iter().zip(&want).enumerate() {
                assert_eq!(a, b, "{name}: packed byte {i}: {a:02x} vs {b:02x}");
            }
            match scales {
                BlockScales::Plain(absmax) => {
                    assert_eq!(bits(absmax), bits(&hex_f32(s(case, "absmax"))), "{name}")
                }
                BlockScales::Double(d) => {
                    assert_eq!(d.codes, hex_bytes(s(case, "qabsmax")), "{name}: qabsmax");
                    assert_eq!(
                        bits(&d.absmax2),
                        bits(&hex_f32(s(case, "absmax2"))),
                        "{name}"
                    );
                    assert_eq!(d.offset.to_bits(), hex_f32(s(case, "offset"))[0].to_bits());
                    let decoded: Vec<f32> = (0..scales.len()).map(|b| scales.get(b)).collect();
                    let want = hex_f32(s(case, "absmax_dequant"));
                    assert_eq!(bits(&decoded), bits(&want), "{name}: decoded absmax");
                }
            }
        }
        check_dequant(name, &q, case);
    }
}
