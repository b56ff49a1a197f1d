//! The one padding rule every collective here uses for uneven sizes.
//!
//! A flat buffer of `n` elements is cut into `world_size` contiguous pieces of
//! `ceil(n / world_size)` elements; rank `r` owns `[r*c, min((r+1)*c, n))` and the tail of the
//! last pieces is zero padding. This is exactly ZeRO-3's `ds_tensor` rule (REFERENCE §1.7:
//! `ceil(numel/ws)` per rank, last rank zero-padded). ZeRO 1/2 first pad the flat group to a
//! multiple of `2 * world_size`, so their pieces are equal and this rule gives the same cut as
//! DeepSpeed's `get_data_parallel_partitions`.

use std::ops::Range;

/// Elements each rank's piece holds (padding included): `ceil(n / world_size)`.
pub fn partition_len(n: usize, world_size: usize) -> usize {
    n.div_ceil(world_size.max(1))
}

/// The real (unpadded) elements of rank `rank`'s piece of an `n`-element buffer; empty when
/// the whole piece is padding (e.g. n = 5, world 4: pieces of 2, rank 3 holds none).
pub fn partition_range(n: usize, world_size: usize, rank: usize) -> Range<usize> {
    let c = partition_len(n, world_size);
    let lo = (rank * c).min(n);
    let hi = ((rank + 1) * c).min(n);
    lo..hi
}

/// `n` rounded up to a multiple of `align` (DeepSpeed's `aligned_numel`, with
/// `align = 2 * world_size` for ZeRO 1/2).
pub fn aligned_len(n: usize, align: usize) -> usize {
    n.div_ceil(align.max(1)) * align.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_pieces_last_padded() {
        // T7's shape: 15 elements over 2 ranks -> 8 and 7 (+1 pad).
        assert_eq!(partition_len(15, 2), 8);
        assert_eq!(partition_range(15, 2, 0), 0..8);
        assert_eq!(partition_range(15, 2, 1), 8..15);
        assert_eq!(partition_range(5, 4, 3), 5..5);
        assert_eq!(partition_range(5, 4, 2), 4..5);
        // T10: 53 elements aligned to 2*ws=4 -> 56, equal pieces of 28.
        assert_eq!(aligned_len(53, 4), 56);
        assert_eq!(partition_len(56, 2), 28);
        assert_eq!(partition_len(0, 3), 0);
    }
}
