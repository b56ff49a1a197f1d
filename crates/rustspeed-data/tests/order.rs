mod common;

use common::PAD;
use rustspeed_data::rng::{permutation, SplitMix64};
use rustspeed_data::{
    collate, micro_batches, rank_share, DataCursor, DataOrder, DataState, Sample, IGNORE_INDEX,
};

fn order(n: usize, shuffle: bool) -> DataOrder {
    DataOrder {
        num_samples: n,
        seed: 1234,
        shuffle,
        drop_last: false,
    }
}

#[test]
fn splitmix64_matches_the_reference_generator() {
    // Vigna's splitmix64.c from state 0.
    let mut g = SplitMix64::new(0);
    assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    let mut g = SplitMix64::new(7);
    for n in [1u64, 2, 3, 10, 1 << 40] {
        assert!((0..200).all(|_| g.below(n) < n));
    }
    let p = permutation(100, &mut SplitMix64::new(3));
    let mut sorted = p.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_ne!(p, sorted);
}

#[test]
fn shuffling_is_per_epoch_and_reproducible() {
    let o = order(50, true);
    let e0 = o.epoch_order(0);
    assert_eq!(e0, o.epoch_order(0));
    assert_ne!(e0, o.epoch_order(1));
    assert_ne!(e0, DataOrder { seed: 1235, ..o }.epoch_order(0));
    assert_eq!(order(5, false).epoch_order(3), vec![0, 1, 2, 3, 4]);
}

#[test]
fn steps_cover_each_epoch_in_order_of_b() {
    let o = order(10, false);
    let mut c = DataCursor::new(o);
    let steps: Vec<(u64, Vec<usize>)> = (0..5)
        .map(|_| c.next_step(4))
        .map(|s| (s.epoch, s.samples))
        .collect();
    assert_eq!(
        steps,
        vec![
            (0, vec![0, 1, 2, 3]),
            (0, vec![4, 5, 6, 7]),
            (0, vec![8, 9]),
            (1, vec![0, 1, 2, 3]),
            (1, vec![4, 5, 6, 7]),
        ]
    );
    assert_eq!(o.steps_per_epoch(4), 3);
    let dropping = DataOrder {
        drop_last: true,
        ..o
    };
    let mut c = DataCursor::new(dropping);
    let epochs: Vec<u64> = (0..4).map(|_| c.next_step(4).epoch).collect();
    assert_eq!(epochs, vec![0, 0, 1, 1]);
    assert_eq!(dropping.steps_per_epoch(4), 2);
}

#[test]
fn a_resumed_cursor_sees_exactly_the_uninterrupted_samples() {
    let o = order(23, true);
    let mut straight = DataCursor::new(o);
    let all: Vec<Vec<usize>> = (0..20).map(|_| straight.next_step(5).samples).collect();
    for stop in [0, 3, 4, 5, 13] {
        let mut first = DataCursor::new(o);
        let mut seen: Vec<Vec<usize>> = (0..stop).map(|_| first.next_step(5).samples).collect();
        // Through JSON, as the checkpoint stores it.
        let saved = serde_json::to_string(&first.state()).unwrap();
        let state: DataState = serde_json::from_str(&saved).unwrap();
        let mut resumed = DataCursor::resume(o, state).unwrap();
        seen.extend((stop..20).map(|_| resumed.next_step(5).samples));
        assert_eq!(seen, all, "stopped after {stop} steps");
    }
    // Every epoch is a permutation: 23 samples in steps of 5 → 5 steps per epoch.
    let mut epoch0: Vec<usize> = all[..5].concat();
    epoch0.sort_unstable();
    assert_eq!(epoch0, (0..23).collect::<Vec<_>>());
}

#[test]
fn resuming_with_other_data_is_refused() {
    let o = order(23, true);
    let state = DataCursor::new(o).state();
    let err = DataCursor::resume(order(24, true), state)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cannot resume the data order: the checkpoint has num_samples = 23, the current data has 24"
    );
    let err = DataCursor::resume(DataOrder { seed: 1, ..o }, state)
        .unwrap_err()
        .to_string();
    assert!(err.contains("seed = 1234, the current data has 1"), "{err}");
}

#[test]
fn ranks_take_contiguous_shares_independent_of_world_size() {
    // B = 8 = micro 2 x accumulation 2 x world 2.
    let mut c = DataCursor::new(order(20, true));
    let step = c.next_step(8);
    let r0 = step.for_rank(0, 2);
    let r1 = step.for_rank(1, 2);
    assert_eq!([r0, r1].concat(), step.samples);
    assert_eq!(r0, &step.samples[..4]);
    let micro: Vec<&[usize]> = micro_batches(r1, 2).collect();
    assert_eq!(micro, vec![&step.samples[4..6], &step.samples[6..8]]);
    // World 4 takes the same eight samples in quarters.
    let quarters: Vec<usize> = (0..4).flat_map(|r| step.for_rank(r, 4).to_vec()).collect();
    assert_eq!(quarters, step.samples);
    // An uneven (last) step splits like numpy's array_split.
    assert_eq!(
        (0..3).map(|r| rank_share(7, r, 3)).collect::<Vec<_>>(),
        vec![0..3, 3..5, 5..7]
    );
    assert_eq!(rank_share(1, 1, 2), 1..1);
}

#[test]
fn batches_pad_right_with_ignored_labels() {
    let a = Sample {
        input_ids: vec![5, 6, 7],
        labels: vec![IGNORE_INDEX, 6, 7],
    };
    let b = Sample::all_targets(vec![9]);
    let batch = collate(&[&a, &b], PAD, None);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
    assert_eq!(batch.input_ids, vec![5, 6, 7, 9, PAD, PAD]);
    assert_eq!(
        batch.labels,
        vec![IGNORE_INDEX, 6, 7, 9, IGNORE_INDEX, IGNORE_INDEX]
    );
    assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.row_ids(1), &[9, PAD, PAD]);
    let padded = collate(&[&a, &b], PAD, Some(4));
    assert_eq!(padded.seq_len, 4);
    assert_eq!(padded.row_labels(0), &[IGNORE_INDEX, 6, 7, IGNORE_INDEX]);
}
