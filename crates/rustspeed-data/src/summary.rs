//! Counts reported after the data is prepared, so nothing is lost silently.

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Records that became (part of) samples.
    pub records: usize,
    /// Malformed records skipped under `skip_bad_records`, with their messages.
    pub skipped_records: usize,
    pub skipped_messages: Vec<String>,
    /// Whitespace-only lines of JSONL and .txt files.
    pub blank_lines: usize,
    pub samples: usize,
    /// Tokens in the samples, after truncation and packing.
    pub tokens: usize,
    /// Tokens the loss is taken on: labels other than -100, after the shift (position 0 of a
    /// sample predicts nothing).
    pub loss_tokens: usize,
    pub truncated_samples: usize,
    pub truncated_tokens: usize,
    /// The tail of the packed stream shorter than one block.
    pub packing_dropped_tokens: usize,
    /// Samples dropped because no label token was left (e.g. a prompt longer than max_length):
    /// they would contribute a 0/0 loss.
    pub dropped_without_labels: usize,
}

impl Summary {
    pub(crate) fn skip(&mut self, err: &crate::DataError) {
        self.skipped_records += 1;
        self.skipped_messages.push(err.to_string());
    }
}
