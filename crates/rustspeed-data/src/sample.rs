//! A training sample in HF's unshifted convention: `labels[t]` is the token the model should
//! predict at position t (the loss shifts), `IGNORE_INDEX` where no loss is taken.

use serde::{Deserialize, Serialize};

pub const IGNORE_INDEX: i32 = -100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    /// A sample whose every token is a target (plain language modelling).
    pub fn all_targets(input_ids: Vec<u32>) -> Sample {
        let labels = input_ids.iter().map(|&t| t as i32).collect();
        Sample { input_ids, labels }
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Label tokens that contribute to the loss once shifted: position 0 predicts nothing.
    pub fn num_loss_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Cuts the sample to `max_len` tokens; returns how many tokens were removed.
    pub fn truncate(&mut self, max_len: usize) -> usize {
        let cut = self.input_ids.len().saturating_sub(max_len);
        self.input_ids.truncate(max_len);
        self.labels.truncate(max_len);
        cut
    }
}
