mod common;

use std::path::Path;

use common::{scratch, toy, write, SPECIAL};
use rustspeed_data::{
    prepare, read_file, DataConfig, DataError, EvalData, Format, ReadOptions, Record,
};
use serde_json::{json, Value};

fn read(path: &Path) -> Vec<Record> {
    read_file(path, &ReadOptions::default()).unwrap().records
}

fn fields(records: &[Record]) -> Vec<Value> {
    records
        .iter()
        .map(|r| Value::Object(r.fields.clone()))
        .collect()
}

fn lines(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.loc.line).collect()
}

const ALPACA: [(&str, &str, &str); 3] = [
    ("Say hi", "", "hi"),
    ("Add", "1, 2", "3"),
    ("Quote, \"please\"", "", "line one\nline two"),
];

fn alpaca_json() -> Vec<Value> {
    ALPACA
        .iter()
        .map(|(i, x, o)| json!({"instruction": i, "input": x, "output": o}))
        .collect()
}

#[test]
fn jsonl_skips_blank_lines_and_keeps_line_numbers() {
    let dir = scratch("jsonl");
    let body: Vec<String> = alpaca_json().iter().map(Value::to_string).collect();
    let path = write(
        &dir,
        "a.jsonl",
        &format!("{}\n\n{}\r\n{}", body[0], body[1], body[2]),
    );
    let out = read_file(&path, &ReadOptions::default()).unwrap();
    assert_eq!(fields(&out.records), alpaca_json());
    assert_eq!(lines(&out.records), vec![1, 3, 4]);
    assert_eq!(out.blank_lines, 1);
    assert_eq!(
        out.records[2].loc.to_string(),
        format!("{}:4", path.display())
    );
}

#[test]
fn json_array_elements_know_their_start_line() {
    let dir = scratch("json_array");
    let text = format!(
        "[\n  {},\n  {{\n    \"instruction\": \"Add\", \"input\": \"1, 2\",\n    \"output\": \"3\"\n  }},\n  {}\n]\n",
        alpaca_json()[0],
        alpaca_json()[2]
    );
    let path = write(&dir, "a.json", &text);
    let recs = read(&path);
    assert_eq!(fields(&recs), alpaca_json());
    assert_eq!(lines(&recs), vec![2, 3, 7]);

    let bad = write(
        &dir,
        "bad.json",
        "[\n {\"text\": \"a\"},\n {\"text\": \"b\" \"x\"}\n]",
    );
    let err = read_file(&bad, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("{}:3: bad JSON: expected `,` or `}}`", bad.display())
    );

    let not_array = write(&dir, "obj.json", "{\"text\": \"a\"}");
    let err = read_file(&not_array, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains(":1: expected a JSON array"), "{err}");
}

#[test]
fn csv_and_tsv_with_quoted_multiline_cells() {
    let dir = scratch("csv");
    let csv = write(
        &dir,
        "a.csv",
        "instruction,input,output\nSay hi,,hi\nAdd,\"1, 2\",3\n\"Quote, \"\"please\"\"\",,\"line one\nline two\"\n",
    );
    let recs = read(&csv);
    assert_eq!(fields(&recs), alpaca_json());
    assert_eq!(lines(&recs), vec![2, 3, 4]);

    let tsv = write(
        &dir,
        "a.tsv",
        "instruction\tinput\toutput\nSay hi\t\thi\nAdd\t1, 2\t3\n\"Quote, \"\"please\"\"\"\t\t\"line one\nline two\"\n",
    );
    assert_eq!(fields(&read(&tsv)), alpaca_json());

    let ragged = write(&dir, "bad.csv", "text,id\na,1\nb\nc,3\n");
    let err = read_file(&ragged, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}:3: bad CSV row: found 1 fields, expected 2 (as many as the header row)",
            ragged.display()
        )
    );
    let skipped = read_file(
        &ragged,
        &ReadOptions {
            skip_bad_records: true,
            ..ReadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(lines(&skipped.records), vec![2, 4]);
    assert_eq!(skipped.skipped.len(), 1);
}

#[test]
fn txt_is_one_text_per_nonblank_line() {
    let dir = scratch("txt");
    let path = write(&dir, "a.txt", "first line\n\n  \nsecond line\r\nthird");
    let out = read_file(
        &path,
        &ReadOptions {
            text_column: "body".to_string(),
            ..ReadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(
        fields(&out.records),
        vec![
            json!({"body": "first line"}),
            json!({"body": "second line"}),
            json!({"body": "third"})
        ]
    );
    assert_eq!(lines(&out.records), vec![1, 4, 5]);
    assert_eq!(out.blank_lines, 2);
}

#[test]
fn unknown_extension_and_missing_file_and_empty_file() {
    let dir = scratch("misc");
    let err = read_file(&dir.join("data.xml"), &ReadOptions::default()).unwrap_err();
    assert!(
        matches!(err, DataError::UnknownExtension { ref ext, .. } if ext == "xml"),
        "{err}"
    );
    let err = read_file(&dir.join("none.jsonl"), &ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("none.jsonl: cannot read"), "{err}");
    let empty = write(&dir, "empty.jsonl", "\n\n");
    let err = read_file(&empty, &ReadOptions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: the data has no records", empty.display())
    );
}

#[test]
fn bad_records_name_file_line_and_field() {
    let dir = scratch("bad_records");
    let path = write(
        &dir,
        "a.jsonl",
        concat!(
            "{\"instruction\": \"a\", \"output\": \"b\"}\n",
            "{\"instruction\": \"a\"}\n",
            "{\"instruction\": \"a\", \"output\": 5}\n",
            "{\"instruction\": \"a\", \"output\": \"b\"\n",
            "[1, 2]\n",
            "{\"instruction\": \"c\", \"input\": [1], \"output\": \"d\"}\n",
            "{\"instruction\": \"e\", \"output\": \"f\"}\n",
        ),
    );
    let p = path.display();
    let mut cfg = DataConfig::new(vec![path.clone()]);
    cfg.format = Some(Format::Alpaca);
    let err = prepare(&cfg, &toy, SPECIAL).unwrap_err().to_string();
    // The reader sees bad JSON first (line 4), before any field is checked.
    assert!(
        err.starts_with(&format!("{p}:4: bad JSON: EOF while parsing an object")),
        "{err}"
    );

    cfg.skip_bad_records = true;
    let data = prepare(&cfg, &toy, SPECIAL).unwrap();
    let s = &data.train.summary;
    assert_eq!(data.train.samples.len(), 2);
    assert_eq!(s.records, 2);
    assert_eq!(s.skipped_records, 5);
    let expected = [
        format!("{p}:4: bad JSON: EOF while parsing an object at column 34"),
        format!("{p}:5: expected a JSON object, found an array"),
        format!("{p}:2: field `output`: missing (the record has fields [instruction])"),
        format!("{p}:3: field `output`: expected a string, found a number"),
        format!("{p}:6: field `input`: expected a string or null, found an array"),
    ];
    assert_eq!(s.skipped_messages, expected);

    // Without skipping, a good-JSON record with a missing field is an error naming it.
    let missing = write(
        &dir,
        "b.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"output\": null}\n",
    );
    let mut cfg = DataConfig::new(vec![missing.clone()]);
    cfg.format = Some(Format::Alpaca);
    let err = prepare(&cfg, &toy, SPECIAL).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:2: field `output`: expected a string, found null",
            missing.display()
        )
    );
}

#[test]
fn eval_split_is_deterministic_and_disjoint() {
    let dir = scratch("eval_split");
    let body: String = (0..40)
        .map(|i| format!("{{\"text\": \"doc {i}\"}}\n"))
        .collect();
    let path = write(&dir, "a.jsonl", &body);
    let mut cfg = DataConfig::new(vec![path]);
    cfg.packing = Some(false);
    cfg.eval = EvalData::Fraction(0.1);
    let a = prepare(&cfg, &toy, SPECIAL).unwrap();
    let b = prepare(&cfg, &toy, SPECIAL).unwrap();
    let eval = a.eval.as_ref().unwrap();
    assert_eq!(eval.samples.len(), 4);
    assert_eq!(a.train.samples.len(), 36);
    assert_eq!(eval.samples, b.eval.as_ref().unwrap().samples);
    for s in &eval.samples {
        assert!(!a.train.samples.contains(s));
    }
    cfg.seed = 7;
    let c = prepare(&cfg, &toy, SPECIAL).unwrap();
    assert_ne!(
        c.eval.unwrap().samples,
        eval.samples,
        "another seed picks another eval set"
    );

    cfg.eval = EvalData::Fraction(1.5);
    let err = prepare(&cfg, &toy, SPECIAL).unwrap_err().to_string();
    assert!(err.contains("--eval-split = 1.5"), "{err}");
}

#[cfg(feature = "parquet")]
mod parquet_input {
    use std::sync::Arc;

    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// Writes the Alpaca rows the way pyarrow would: snappy pages, UTF8 strings, `input`
    /// nullable (null in the first row, empty in the third).
    fn write_parquet(path: &Path) {
        let schema = parse_message_type(
            "message schema {
                REQUIRED BYTE_ARRAY instruction (UTF8);
                OPTIONAL BYTE_ARRAY input (UTF8);
                REQUIRED BYTE_ARRAY output (UTF8);
            }",
        )
        .unwrap();
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let col = |k: usize| -> Vec<ByteArray> {
            super::ALPACA
                .iter()
                .map(|r| ByteArray::from([r.0, r.1, r.2][k]))
                .collect()
        };
        let columns: [(Vec<ByteArray>, Option<Vec<i16>>); 3] = [
            (col(0), None),
            (
                vec![ByteArray::from("1, 2"), ByteArray::from("")],
                Some(vec![0, 1, 1]),
            ),
            (col(2), None),
        ];
        for (values, def) in columns {
            let mut w = group.next_column().unwrap().unwrap();
            w.typed::<ByteArrayType>()
                .write_batch(&values, def.as_deref(), None)
                .unwrap();
            w.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn parquet_rows_become_records_with_row_numbers() {
        let dir = scratch("parquet");
        let path = dir.join("a.parquet");
        write_parquet(&path);
        let recs = read(&path);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].fields["input"], Value::Null);
        assert_eq!(recs[1].fields["input"], json!("1, 2"));
        assert_eq!(recs[2].fields["output"], json!("line one\nline two"));
        assert_eq!(
            recs[1].loc.to_string(),
            format!("{}: row 2", path.display())
        );
    }

    #[test]
    fn csv_parquet_and_jsonl_give_the_same_samples() {
        let dir = scratch("same_samples");
        let pq = dir.join("a.parquet");
        write_parquet(&pq);
        let jsonl_body: String = alpaca_json().iter().map(|v| format!("{v}\n")).collect();
        let jsonl = write(&dir, "a.jsonl", &jsonl_body);
        let csv = write(
            &dir,
            "a.csv",
            "instruction,input,output\nSay hi,,hi\nAdd,\"1, 2\",3\n\"Quote, \"\"please\"\"\",,\"line one\nline two\"\n",
        );
        let samples = |p: &Path| {
            let data = prepare(&DataConfig::new(vec![p.to_path_buf()]), &toy, SPECIAL).unwrap();
            assert_eq!(data.format, Format::Alpaca);
            data.train.samples
        };
        let from_jsonl = samples(&jsonl);
        assert_eq!(from_jsonl.len(), 3);
        assert_eq!(samples(&csv), from_jsonl);
        assert_eq!(samples(&pq), from_jsonl);
    }
}
