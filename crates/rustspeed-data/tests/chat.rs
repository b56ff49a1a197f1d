mod common;

use common::{ids, scratch, toy, write, SPECIAL};
use rustspeed_data::{
    chat_sample, prepare, ChatTemplate, DataConfig, Format, Record, Sample, IGNORE_INDEX,
};
use serde_json::{json, Value};

/// Builds the expected sample from (text, trained?) pieces under the byte tokenizer.
fn pieces(parts: &[(&str, bool)]) -> Sample {
    let mut s = Sample {
        input_ids: vec![],
        labels: vec![],
    };
    for (text, train) in parts {
        for t in ids(text) {
            s.input_ids.push(t);
            s.labels.push(if *train { t as i32 } else { IGNORE_INDEX });
        }
    }
    s
}

fn conversation() -> Value {
    json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."}
    ]})
}

fn record(v: Value) -> Record {
    let dir = scratch("chat_record");
    let path = write(&dir, "a.jsonl", &format!("{v}\n"));
    rustspeed_data::read_file(&path, &Default::default())
        .unwrap()
        .records
        .remove(0)
}

#[test]
fn chatml_default_trains_on_assistant_turns_only() {
    let dir = scratch("chat_chatml");
    let path = write(&dir, "a.jsonl", &format!("{}\n", conversation()));
    let data = prepare(&DataConfig::new(vec![path]), &toy, SPECIAL).unwrap();
    assert_eq!(data.format, Format::Chat);
    let want = pieces(&[
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", false),
        ("Hello!<|im_end|>\n", true),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", false),
        ("Bye.<|im_end|>\n", true),
    ]);
    assert_eq!(data.train.samples, vec![want]);
}

#[test]
fn generation_markers_define_the_assistant_spans() {
    let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}<a>{% generation %}{{ m.content.strip() }}</a>{% endgeneration %}\n{% else %}<{{ m.role }}>{{ m.content }}\n{% endif %}{% endfor %}";
    let t = ChatTemplate::new(source, "test", Some("<s>".into()), None).unwrap();
    assert!(t.has_generation_markers());
    let mut conv = conversation();
    conv["messages"][2]["content"] = json!("  Hello!  ");
    let s = chat_sample(&record(conv.clone()), "messages", &t, &toy).unwrap();
    let want = pieces(&[
        ("<s><system>Be brief.\n<user>Hi\n<a>", false),
        ("Hello!</a>", true),
        ("<user>Bye\n<a>", false),
        ("Bye.</a>", true),
    ]);
    assert_eq!(s, want);
    // transformers' return_assistant_tokens_mask marks characters 33..43 and 56..64 here.
    let trained: Vec<usize> = (0..s.labels.len())
        .filter(|&i| s.labels[i] != IGNORE_INDEX)
        .collect();
    assert_eq!(trained, (33..43).chain(56..64).collect::<Vec<_>>());
    let msgs = conv["messages"].as_array().unwrap().clone();
    assert!(!t.render(&msgs, false).unwrap().contains('\u{E000}'));
}

#[test]
fn a_template_that_is_not_prefix_stable_is_an_error() {
    let source = "{{ messages | length }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
    let t = ChatTemplate::new(source, "counting", None, None).unwrap();
    let err = chat_sample(&record(conversation()), "messages", &t, &toy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template: counting: the template does not render conversations prefix-stably at message 2"), "{err}");
}

#[test]
fn hf_template_conventions() {
    let t = ChatTemplate::new(
        "{% for m in messages %}\n  {{ m.content | trim }}|{% endfor %}\n{{ ['x', 'é\"', 1, none, true] | tojson }}|{{ [1, [2]] | tojson(indent=2) }}",
        "conventions",
        None,
        None,
    )
    .unwrap();
    let msgs = vec![
        json!({"role": "user", "content": "  a  "}),
        json!({"role": "user", "content": "b"}),
    ];
    // trim_blocks drops the newline after a tag, lstrip_blocks the indentation before one.
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "  a|  b|[\"x\", \"é\\\"\", 1, null, true]|[\n  1,\n  [\n    2\n  ]\n]"
    );

    let raising = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}",
        "raising",
        None,
        None,
    )
    .unwrap();
    let err = chat_sample(
        &record(json!({"messages": [{"role": "assistant", "content": "x"}]})),
        "messages",
        &raising,
        &toy,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Conversation must start with user"), "{err}");
}

#[test]
fn template_from_tokenizer_config() {
    let dir = scratch("chat_tokenizer_config");
    let cfg = write(
        &dir,
        "tokenizer_config.json",
        &json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
        })
        .to_string(),
    );
    let t = ChatTemplate::from_tokenizer_config(&cfg).unwrap().unwrap();
    let s = chat_sample(&record(json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})), "messages", &t, &toy).unwrap();
    assert_eq!(
        s,
        pieces(&[("<s>user: q\nassistant: ", false), ("a</s>\n", true)])
    );

    let none = write(&dir, "plain.json", "{\"eos_token\": \"</s>\"}");
    assert!(ChatTemplate::from_tokenizer_config(&none)
        .unwrap()
        .is_none());
}

#[test]
fn malformed_messages_name_the_field() {
    let bad = |v: Value| {
        chat_sample(&record(v), "messages", &ChatTemplate::chatml(), &toy)
            .unwrap_err()
            .to_string()
    };
    let e = bad(json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}));
    assert!(
        e.ends_with(":1: field `messages[1].content`: missing"),
        "{e}"
    );
    let e = bad(json!({"messages": [{"role": 3, "content": "x"}]}));
    assert!(
        e.ends_with(":1: field `messages[0].role`: expected a string, found a number"),
        "{e}"
    );
    let e = bad(json!({"messages": "hi"}));
    assert!(
        e.ends_with(
            ":1: field `messages`: expected an array of {role, content} objects, found a string"
        ),
        "{e}"
    );
}
