//! Data parallelism: each rank takes a contiguous share of a step's samples, so that which
//! samples a step trains on does not depend on the world size.

use std::ops::Range;

/// The part of a step's `len` samples that rank `rank` of `world` takes: `len / world` each,
/// the first `len % world` ranks one more (numpy's `array_split`). With `len` = B =
/// micro_batch * grad_accum * world every rank gets micro_batch * grad_accum samples.
pub fn rank_share(len: usize, rank: usize, world: usize) -> Range<usize> {
    assert!(world > 0 && rank < world, "rank {rank} of world {world}");
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

/// Splits a rank's share into its gradient-accumulation micro-batches, in order.
pub fn micro_batches(share: &[usize], micro_batch_size: usize) -> std::slice::Chunks<'_, usize> {
    assert!(micro_batch_size > 0, "micro batch size must be positive");
    share.chunks(micro_batch_size)
}
