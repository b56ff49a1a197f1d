//! The text format: HF run_clm's `group_texts` packing, or one truncated sample per text.

use crate::record::Record;
use crate::sample::Sample;
use crate::tokenize::{SpecialIds, Tokenize};
use crate::DataError;

/// Tokenizes one text with special tokens and ends it with EOS (unless the tokenizer already
/// put one there), so packed documents stay separated.
pub fn encode_document(
    rec: &Record,
    text_column: &str,
    tok: &dyn Tokenize,
    special: SpecialIds,
) -> Result<Vec<u32>, DataError> {
    let text = crate::fields::required_str(rec, text_column)?;
    let mut ids = tok
        .encode(text, true)
        .map_err(|message| DataError::Tokenizer {
            loc: rec.loc.clone(),
            message,
        })?;
    if ids.last() != Some(&special.eos) {
        ids.push(special.eos);
    }
    Ok(ids)
}

/// Concatenates documents in order and cuts the stream into `block_size` blocks, dropping the
/// remainder. Returns the blocks and the number of dropped tokens.
pub fn pack<I>(documents: I, block_size: usize) -> (Vec<Sample>, usize)
where
    I: IntoIterator<Item = Vec<u32>>,
{
    assert!(block_size > 0, "block_size must be positive");
    let mut stream: Vec<u32> = Vec::new();
    for doc in documents {
        stream.extend_from_slice(&doc);
    }
    let kept = stream.len() / block_size * block_size;
    let dropped = stream.len() - kept;
    let blocks = stream[..kept]
        .chunks_exact(block_size)
        .map(|c| Sample::all_targets(c.to_vec()))
        .collect();
    (blocks, dropped)
}
