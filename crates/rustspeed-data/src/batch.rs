//! Collation: right padding to the longest sample, labels -100 on padding.

use crate::sample::{Sample, IGNORE_INDEX};

/// Row-major `[batch_size, seq_len]` tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u8>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    pub fn row_ids(&self, row: usize) -> &[u32] {
        &self.input_ids[row * self.seq_len..(row + 1) * self.seq_len]
    }

    pub fn row_labels(&self, row: usize) -> &[i32] {
        &self.labels[row * self.seq_len..(row + 1) * self.seq_len]
    }
}

/// Pads on the right to the longest sample, rounded up to `pad_to_multiple_of` if given.
pub fn collate(samples: &[&Sample], pad_id: u32, pad_to_multiple_of: Option<usize>) -> Batch {
    let longest = samples.iter().map(|s| s.len()).max().unwrap_or(0);
    let seq_len = match pad_to_multiple_of {
        Some(m) if m > 0 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let mut batch = Batch {
        input_ids: Vec::with_capacity(samples.len() * seq_len),
        labels: Vec::with_capacity(samples.len() * seq_len),
        attention_mask: Vec::with_capacity(samples.len() * seq_len),
        batch_size: samples.len(),
        seq_len,
    };
    for s in samples {
        let pad = seq_len - s.len();
        batch.input_ids.extend_from_slice(&s.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.labels.extend_from_slice(&s.labels);
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        batch.attention_mask.extend(std::iter::repeat_n(1, s.len()));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad));
    }
    batch
}
