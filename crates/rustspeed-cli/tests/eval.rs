//! `rustspeed eval` against the loss transformers gives for a tiny random GPT-2
//! (tests/golden/eval, from tools/golden/eval_golden.py), and against the tiny LLaMA GGUF of
//! rustspeed-models' golden files; bad data lines must name file:line and exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval")
}

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap()
}

fn json_out(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rustspeed-eval-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check(got: &Value, want: &Value, rel: f64) {
    assert_eq!(got["tokens"], want["tokens"], "{got} vs {want}");
    for key in ["loss", "perplexity"] {
        let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
        assert!(((g - w) / w).abs() < rel, "{key}: {g} vs transformers {w}");
    }
}

#[test]
fn gpt2_loss_matches_transformers_default_and_truncated() {
    let dir = golden();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = dir.to_str().unwrap();
    let data = dir.join("data.jsonl");
    let data = data.to_str().unwrap();
    // Batches of 2 mix lengths (padding must not count); batches of 1 must agree.
    for batch in ["1", "2"] {
        let got = json_out(&eval(&[
            "--model",
            model,
            "--data",
            data,
            "--json",
            "--batch-size",
            batch,
        ]));
        check(&got, &expected["32"], 1e-5);
    }
    let got = json_out(&eval(&[
        "--model",
        model,
        "--data",
        data,
        "--json",
        "--max-length",
        "8",
    ]));
    check(&got, &expected["8"], 1e-5);

    // bf16 compute stays close to f32.
    let got = json_out(&eval(&[
        "--model", model, "--data", data, "--json", "--dtype", "bf16",
    ]));
    check(&got, &expected["32"], 2e-2);

    // The plain-text report carries the same numbers.
    let out = eval(&["--model", model, "--data", data]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("loss: ") && text.contains("perplexity: "),
        "{text}"
    );
    assert!(
        text.contains(&format!("tokens: {}", expected["32"]["tokens"])),
        "{text}"
    );
}

#[test]
fn txt_files_hold_one_text_per_line() {
    let dir = tempdir("txt");
    let jsonl = std::fs::read_to_string(golden().join("data.jsonl")).unwrap();
    let lines: Vec<String> = jsonl
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let txt = dir.join("data.txt");
    std::fs::write(&txt, lines.join("\n\n")).unwrap();
    let model = golden();
    let a = json_out(&eval(&[
        "--model",
        model.to_str().unwrap(),
        "--data",
        txt.to_str().unwrap(),
        "--json",
    ]));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(golden().join("expected.json")).unwrap())
            .unwrap();
    check(&a, &expected["32"], 1e-5);
}

#[test]
fn gguf_model_is_evaluated_with_its_embedded_tokenizer() {
    let models =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../rustspeed-models/tests/golden/gguf");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(models.join("llama.json")).unwrap()).unwrap();
    let dir = tempdir("gguf");
    let data = dir.join("data.jsonl");
    std::fs::write(
        &data,
        serde_json::json!({"text": want["loss_text"]}).to_string(),
    )
    .unwrap();
    let got = json_out(&eval(&[
        "--model",
        models.join("llama.gguf").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]));
    let tokens = want["encodings"][want["loss_text"].as_str().unwrap()]
        .as_array()
        .unwrap()
        .len()
        - 1;
    let expected = serde_json::json!({"loss": want["loss"], "perplexity": want["loss"].as_f64().unwrap().exp(), "tokens": tokens});
    check(&got, &expected, 1e-5);
}

#[test]
fn bad_lines_name_file_and_line_and_exit_2() {
    let dir = tempdir("bad");
    let model = golden();
    for (content, needle) in [
        (
            "{\"text\": \"fine\"}\nnot json\n",
            "data.jsonl:2: not valid JSON",
        ),
        (
            "{\"text\": \"fine\"}\n\n{\"txt\": \"x\"}\n",
            "data.jsonl:3: no `text` field",
        ),
        ("{\"text\": 5}\n", "data.jsonl:1: `text` is 5"),
    ] {
        let data = dir.join("data.jsonl");
        std::fs::write(&data, content).unwrap();
        let out = eval(&[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let out = eval(&["--model", dir.to_str().unwrap(), "--data", "x.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    let data = dir.join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let out = eval(&[
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("neither an HF model directory"), "{err}");
}

fn models_golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rustspeed-models/tests/golden")
        .join(name)
}

/// The batch of a LoRA golden (tools/golden/lora_golden.py) as pre-tokenized JSONL lines, and
/// PEFT's eval loss on it.
fn lora_case(case: &str, dir: &Path) -> (PathBuf, PathBuf, f64, u64) {
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(models_golden(case).join("golden.json")).unwrap(),
    )
    .unwrap();
    let ids = g["input_ids"].as_array().unwrap();
    let labels = g["labels"].as_array().unwrap();
    let mut lines = String::new();
    let mut predicted = 0;
    for (i, l) in ids.iter().zip(labels) {
        lines.push_str(&serde_json::json!({"input_ids": i, "labels": l}).to_string());
        lines.push('\n');
        predicted += l.as_array().unwrap()[1..]
            .iter()
            .filter(|x| x.as_i64() != Some(-100))
            .count() as u64;
    }
    let data = dir.join(format!("{case}.jsonl"));
    std::fs::write(&data, lines).unwrap();
    let base = models_golden(g["model"].as_str().unwrap());
    (base, data, g["loss"].as_f64().unwrap(), predicted)
}

/// `eval --adapter` gives PEFT's eval loss (PeftModel on the base, labels with -100 ignored).
#[test]
fn adapter_eval_gives_pefts_loss() {
    let dir = tempdir("adapter");
    for case in ["lora_gpt2", "lora_llama"] {
        let (base, data, want, predicted) = lora_case(case, &dir);
        let adapter = models_golden(case).join("adapter");
        let args = [
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--adapter",
            adapter.to_str().unwrap(),
        ];
        let got = json_out(&eval(&args));
        assert_eq!(got["tokens"].as_u64(), Some(predicted), "{case}");
        let loss = got["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{case}: eval --adapter loss {loss} vs PEFT {want}"
        );
        // Without the adapter the loss is the base's, which differs.
        let plain = json_out(&eval(&args[..5]))["loss"].as_f64().unwrap();
        assert!(
            (plain - want).abs() > 1e-3,
            "{case}: adapter changed nothing"
        );

        // A quantized base: close to the dense adapted loss, but not equal to it.
        for q in [
            &["--quantize", "nf4", "--double-quant"][..],
            &["--quantize", "fp4"],
            &["--quantize", "int8"],
        ] {
            let mut a = args.to_vec();
            a.extend_from_slice(q);
            let ql = json_out(&eval(&a))["loss"].as_f64().unwrap();
            let rel = ((ql - loss) / loss).abs();
            assert!(
                rel > 1e-7 && rel < 0.05,
                "{case} {q:?}: loss {ql} vs dense {loss}"
            );
        }
    }
}

#[test]
fn adapter_and_quantize_flags_are_checked() {
    let dir = tempdir("adapter-flags");
    let (base, data, _, _) = lora_case("lora_gpt2", &dir);
    let (base, data) = (base.to_str().unwrap(), data.to_str().unwrap());
    // --quantize alone, a bad format, --double-quant on int8, an adapter for another model.
    let adapter = models_golden("lora_gpt2").join("adapter");
    let llama_adapter = models_golden("lora_llama").join("adapter");
    for extra in [
        vec!["--quantize", "nf4"],
        vec!["--adapter", adapter.to_str().unwrap(), "--quantize", "nf3"],
        vec![
            "--adapter",
            adapter.to_str().unwrap(),
            "--quantize",
            "int8",
            "--double-quant",
        ],
        vec!["--adapter", llama_adapter.to_str().unwrap()],
        vec!["--adapter", dir.to_str().unwrap()],
    ] {
        let mut a = vec!["--model", base, "--data", data];
        a.extend_from_slice(&extra);
        let out = eval(&a);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Pre-tokenized lines are checked too.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"input_ids\": [1, 2], \"labels\": [1]}\n").unwrap();
    let out = eval(&["--model", base, "--data", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.jsonl:1"));
}
