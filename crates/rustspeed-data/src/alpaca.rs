//! The alpaca format, with stanford_alpaca's masking rule: tokenize prompt + output (with
//! special tokens), and mask as many leading tokens as the prompt alone tokenizes to.

use crate::fields::{optional_str, required_str};
use crate::format::Columns;
use crate::prompt_template::PromptTemplate;
use crate::record::Record;
use crate::sample::{Sample, IGNORE_INDEX};
use crate::tokenize::{SpecialIds, Tokenize};
use crate::DataError;

/// Builds one untruncated sample. Alpaca appends the EOS *string* to the output; appending the
/// EOS *id* gives the same tokens for HF tokenizers and does not depend on the tokenizer
/// recognising special-token text.
pub fn alpaca_sample(
    rec: &Record,
    cols: &Columns,
    template: &PromptTemplate,
    tok: &dyn Tokenize,
    special: SpecialIds,
) -> Result<Sample, DataError> {
    let instruction = required_str(rec, &cols.instruction)?;
    let input = optional_str(rec, &cols.input)?;
    let output = required_str(rec, &cols.output)?;
    if input.is_some() && !template.uses_input() {
        return Err(DataError::field(
            &rec.loc,
            &cols.input,
            format!(
                "the record has an input but prompt template {} has no {{input}} placeholder",
                template.source_name()
            ),
        ));
    }
    let prompt = template.render(instruction, input);
    let encode = |text: &str| {
        tok.encode(text, true)
            .map_err(|message| DataError::Tokenizer {
                loc: rec.loc.clone(),
                message,
            })
    };
    let prompt_len = encode(&prompt)?.len();
    let mut input_ids = encode(&(prompt + output))?;
    if input_ids.last() != Some(&special.eos) {
        input_ids.push(special.eos);
    }
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < prompt_len {
                IGNORE_INDEX
            } else {
                t as i32
            }
        })
        .collect();
    Ok(Sample { input_ids, labels })
}
