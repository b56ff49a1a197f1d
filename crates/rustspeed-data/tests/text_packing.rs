mod common;

use common::{ids, scratch, toy, write, BOS, EOS, SPECIAL};
use rustspeed_data::{pack, prepare, DataConfig, Format, Sample};

#[test]
fn packing_matches_group_texts_by_hand() {
    let dir = scratch("packing");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"text\": \"ab\"}\n{\"text\": \"cde\"}\n{\"text\": \"f\"}\n",
    );
    let mut cfg = DataConfig::new(vec![path]);
    cfg.block_size = 5;
    let data = prepare(&cfg, &toy, SPECIAL).unwrap();
    assert_eq!((data.format, data.packing), (Format::Text, true));
    // BOS a b EOS | BOS c d e EOS | BOS f EOS = 12 tokens: two blocks of 5, 2 dropped.
    let t = |c: &str| ids(c)[0];
    let expected = [
        vec![BOS, t("a"), t("b"), EOS, BOS],
        vec![t("c"), t("d"), t("e"), EOS, BOS],
    ];
    let got: Vec<Vec<u32>> = data
        .train
        .samples
        .iter()
        .map(|s| s.input_ids.clone())
        .collect();
    assert_eq!(got, expected);
    for s in &data.train.samples {
        let as_labels: Vec<i32> = s.input_ids.iter().map(|&t| t as i32).collect();
        assert_eq!(s.labels, as_labels, "packed blocks train on every token");
    }
    let sum = &data.train.summary;
    assert_eq!(
        (
            sum.records,
            sum.samples,
            sum.tokens,
            sum.packing_dropped_tokens
        ),
        (3, 2, 10, 2)
    );
    assert_eq!(sum.loss_tokens, 8);
}

#[test]
fn eos_is_not_doubled_when_the_tokenizer_appends_it() {
    let with_eos = |text: &str, special: bool| {
        let mut v = toy(text, special);
        if special {
            v.push(EOS);
        }
        v
    };
    let dir = scratch("packing_eos");
    let path = write(&dir, "a.txt", "ab\ncd\n");
    let mut cfg = DataConfig::new(vec![path]);
    cfg.block_size = 4;
    let data = prepare(&cfg, &with_eos, SPECIAL).unwrap();
    let got: Vec<Vec<u32>> = data
        .train
        .samples
        .iter()
        .map(|s| s.input_ids.clone())
        .collect();
    let mut first = vec![BOS];
    first.extend(ids("ab"));
    first.push(EOS);
    let mut second = vec![BOS];
    second.extend(ids("cd"));
    second.push(EOS);
    assert_eq!(got, vec![first, second]);
}

#[test]
fn pack_drops_a_stream_shorter_than_one_block() {
    let (blocks, dropped) = pack(vec![vec![1, 2], vec![3]], 4);
    assert!(blocks.is_empty());
    assert_eq!(dropped, 3);
    let (blocks, dropped) = pack(vec![vec![1, 2], vec![3, 4, 5]], 2);
    assert_eq!(
        blocks,
        vec![
            Sample::all_targets(vec![1, 2]),
            Sample::all_targets(vec![3, 4])
        ]
    );
    assert_eq!(dropped, 1);
}

#[test]
fn unpacked_text_is_one_truncated_sample_per_text() {
    let dir = scratch("unpacked");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"text\": \"abcdef\"}\n{\"text\": \"xy\"}\n",
    );
    let mut cfg = DataConfig::new(vec![path]);
    cfg.packing = Some(false);
    cfg.max_length = Some(4);
    let data = prepare(&cfg, &toy, SPECIAL).unwrap();
    let got: Vec<Vec<u32>> = data
        .train
        .samples
        .iter()
        .map(|s| s.input_ids.clone())
        .collect();
    let mut long = vec![BOS];
    long.extend(ids("abc"));
    let mut short = vec![BOS];
    short.extend(ids("xy"));
    short.push(EOS);
    assert_eq!(got, vec![long, short]);
    let sum = &data.train.summary;
    // "abcdef" is BOS + 6 + EOS = 8 tokens, 4 cut.
    assert_eq!((sum.truncated_samples, sum.truncated_tokens), (1, 4));
}

#[test]
fn packing_is_refused_for_masked_formats() {
    let dir = scratch("packing_refused");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n",
    );
    let mut cfg = DataConfig::new(vec![path]);
    cfg.packing = Some(true);
    let err = prepare(&cfg, &toy, SPECIAL).unwrap_err().to_string();
    assert!(
        err.starts_with("invalid data option --packing = true with --format alpaca"),
        "{err}"
    );
}
