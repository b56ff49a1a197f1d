//! `--eval-split FRACTION`: a deterministic random subset of the records held out for eval.

use crate::rng::{permutation, SplitMix64, EVAL_SPLIT_STREAM};
use crate::DataError;

/// Returns (train, eval) record indices, both in file order. The eval part has
/// `ceil(fraction * n)` records (as HF datasets' `train_test_split`), chosen by the seed's
/// eval-split stream.
pub fn split_eval(
    n: usize,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), DataError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::InvalidOption {
            name: "--eval-split",
            value: fraction.to_string(),
            expected: "a fraction strictly between 0 and 1",
        });
    }
    let n_eval = (fraction * n as f64).ceil() as usize;
    if n_eval == 0 || n_eval >= n {
        return Err(DataError::InvalidOption {
            name: "--eval-split",
            value: format!("{fraction} of {n} records"),
            expected: "a fraction leaving at least one record for training and one for eval",
        });
    }
    let perm = permutation(n, &mut SplitMix64::for_stream(seed, EVAL_SPLIT_STREAM));
    let mut is_eval = vec![false; n];
    for &i in &perm[..n_eval] {
        is_eval[i] = true;
    }
    let (eval, train): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| is_eval[i]);
    Ok((train, eval))
}
