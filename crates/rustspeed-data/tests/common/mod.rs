//! Test helpers: a byte-level toy tokenizer and scratch files.
#![allow(dead_code)]

use std::path::PathBuf;

use rustspeed_data::SpecialIds;

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const PAD: u32 = 0;
pub const SPECIAL: SpecialIds = SpecialIds {
    eos: EOS,
    bos: Some(BOS),
};

/// One token per byte (id = byte + 3), BOS in front with special tokens: token boundaries are
/// character boundaries, so expected ids can be written down by hand.
pub fn toy(text: &str, add_special_tokens: bool) -> Vec<u32> {
    let mut ids = Vec::new();
    if add_special_tokens {
        ids.push(BOS);
    }
    ids.extend(text.bytes().map(|b| u32::from(b) + 3));
    ids
}

pub fn ids(text: &str) -> Vec<u32> {
    toy(text, false)
}

/// A fresh directory per call under Cargo's scratch space. Unique per call: tests run in
/// parallel and several of them go through the same helper (one shared name raced).
pub fn scratch(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let unique = format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("rustspeed-data")
        .join(unique);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write(dir: &std::path::Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}
