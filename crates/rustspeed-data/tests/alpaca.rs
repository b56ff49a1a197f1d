mod common;

use common::{ids, scratch, toy, write, BOS, EOS, SPECIAL};
use rustspeed_data::{
    detect_format, prepare, read_file, Columns, DataConfig, Format, PromptTemplate, ReadOptions,
    Sample, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX,
};

/// BOS + prompt masked, then response + EOS as labels, token by token.
fn expected(prompt: &str, response: &str) -> Sample {
    let mut input_ids = vec![BOS];
    input_ids.extend(ids(prompt));
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    for t in ids(response).into_iter().chain([EOS]) {
        input_ids.push(t);
        labels.push(t as i32);
    }
    Sample { input_ids, labels }
}

const NO_INPUT_PROMPT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi\n\n### Response:";
const INPUT_PROMPT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n### Input:\n1, 2\n\n### Response:";

#[test]
fn alpaca_masks_the_prompt_token_by_token() {
    let dir = scratch("alpaca");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \" hi\"}\n{\"instruction\": \"Add\", \"input\": \"1, 2\", \"output\": \" 3\"}\n",
    );
    let data = prepare(&DataConfig::new(vec![path]), &toy, SPECIAL).unwrap();
    assert_eq!((data.format, data.packing), (Format::Alpaca, false));
    assert_eq!(
        data.train.samples,
        vec![
            expected(NO_INPUT_PROMPT, " hi"),
            expected(INPUT_PROMPT, " 3")
        ]
    );
    assert_eq!(data.train.summary.loss_tokens, (3 + 1) + (2 + 1));
}

#[test]
fn the_built_in_templates_are_stanford_alpacas() {
    let t = PromptTemplate::alpaca();
    assert_eq!(t.render("Say hi", None), NO_INPUT_PROMPT);
    assert_eq!(t.render("Say hi", Some("")), NO_INPUT_PROMPT);
    assert_eq!(t.render("Add", Some("1, 2")), INPUT_PROMPT);
    assert_eq!(
        ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "Say hi"),
        NO_INPUT_PROMPT
    );
}

#[test]
fn prompt_template_files() {
    let dir = scratch("prompt_template");
    let one = write(&dir, "p.txt", "Q: {instruction} {{x}}\n{input}\nA:\n");
    let t = PromptTemplate::from_file(&one).unwrap();
    assert_eq!(t.render("why", Some("ctx")), "Q: why {x}\nctx\nA:");
    assert_eq!(t.render("why", None), "Q: why {x}\n\nA:");

    let two = write(
        &dir,
        "p.json",
        r#"{"prompt_input": "I={instruction} X={input}:", "prompt_no_input": "I={instruction}:"}"#,
    );
    let t = PromptTemplate::from_file(&two).unwrap();
    assert_eq!(t.render("a", Some("b")), "I=a X=b:");
    assert_eq!(t.render("a", None), "I=a:");

    let bad = write(&dir, "bad.txt", "Q: {question}\n");
    let err = PromptTemplate::from_file(&bad).unwrap_err().to_string();
    assert!(err.contains("unknown placeholder {question}"), "{err}");
    let none = write(&dir, "none.txt", "just text\n");
    let err = PromptTemplate::from_file(&none).unwrap_err().to_string();
    assert!(
        err.ends_with("the template has no {instruction} placeholder"),
        "{err}"
    );

    // A record with input under a template without {input} would lose the input silently.
    let no_input = write(&dir, "noinput.txt", "Q: {instruction}\nA:");
    let data = write(
        &dir,
        "d.jsonl",
        "{\"instruction\": \"a\", \"input\": \"b\", \"output\": \"c\"}\n",
    );
    let mut cfg = DataConfig::new(vec![data.clone()]);
    cfg.prompt_template = PromptTemplate::from_file(&no_input).unwrap();
    let err = prepare(&cfg, &toy, SPECIAL).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}:1: field `input`: the record has an input",
            data.display()
        )),
        "{err}"
    );
}

#[test]
fn truncation_keeps_the_prompt_mask_and_drops_samples_without_labels() {
    let dir = scratch("alpaca_trunc");
    let path = write(
        &dir,
        "a.jsonl",
        "{\"instruction\": \"Say hi\", \"output\": \" hello\"}\n{\"instruction\": \"a very long instruction that fills everything\", \"output\": \"x\"}\n",
    );
    let mut cfg = DataConfig::new(vec![path]);
    cfg.prompt_template =
        PromptTemplate::new("{instruction} {input}:", "{instruction}:", "test").unwrap();
    cfg.max_length = Some(10);
    let data = prepare(&cfg, &toy, SPECIAL).unwrap();
    // BOS "Say hi:" (8 tokens, masked) then " h" (2 kept of " hello" + EOS).
    let mut want = expected("Say hi:", " hello");
    want.input_ids.truncate(10);
    want.labels.truncate(10);
    assert_eq!(data.train.samples, vec![want]);
    let sum = &data.train.summary;
    assert_eq!(
        (
            sum.truncated_samples,
            sum.dropped_without_labels,
            sum.samples
        ),
        (2, 1, 1)
    );
}

#[test]
fn csv_columns_can_be_renamed() {
    let dir = scratch("alpaca_columns");
    let path = write(&dir, "a.csv", "question,context,answer\nSay hi,, hi\n");
    let mut cfg = DataConfig::new(vec![path.clone()]);
    cfg.columns = Columns {
        instruction: "question".into(),
        input: "context".into(),
        output: "answer".into(),
        ..Columns::default()
    };
    let data = prepare(&cfg, &toy, SPECIAL).unwrap();
    assert_eq!(data.train.samples, vec![expected(NO_INPUT_PROMPT, " hi")]);

    let recs = read_file(&path, &ReadOptions::default()).unwrap().records;
    let err = detect_format(&recs, &Columns::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fields [answer, context, question] match none of"),
        "{err}"
    );
}
