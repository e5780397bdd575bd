//! Batch loading: seeded determinism, targets = inputs shifted by one, exact resume from
//! `state()`, deterministic validation batches, rank slicing, and size errors naming the split.

mod common;

use datasets::rng::{SplitMix64, Xoshiro256};
use datasets::{
    prepare, Batch, BatchLoader, LoaderState, Split, TokenDataset, TokenizerSpec, ValBatches,
};
use std::sync::Arc;

/// Tokens 0..n: a window's content reveals where it started.
fn counting_tokens(n: u32) -> Arc<[u32]> {
    (0..n).collect::<Vec<u32>>().into()
}

fn draw(loader: &mut BatchLoader, count: usize) -> Vec<Batch> {
    (0..count).map(|_| loader.next_batch()).collect()
}

#[test]
fn rng_matches_reference_outputs() {
    // SplitMix64 reference: first output for seed 0.
    assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    // xoshiro256** reference (prng.di.unimi.it) from state [1, 2, 3, 4].
    let mut rng = Xoshiro256::from_state([1, 2, 3, 4]).unwrap();
    assert_eq!(
        [rng.next_u64(), rng.next_u64(), rng.next_u64()],
        [11520, 0, 1509978240]
    );
    assert!(Xoshiro256::from_state([0; 4]).is_none());
    let mut rng = Xoshiro256::seed_from_u64(7);
    assert!((0..1000).all(|_| rng.next_below(13) < 13));
}

#[test]
fn same_seed_gives_same_batches_and_different_seed_differs() {
    let tokens = counting_tokens(1000);
    let mut a = BatchLoader::new(tokens.clone(), Split::Train, 4, 8, 1234).unwrap();
    let mut b = BatchLoader::new(tokens.clone(), Split::Train, 4, 8, 1234).unwrap();
    let mut c = BatchLoader::new(tokens, Split::Train, 4, 8, 1235).unwrap();
    let batches_a = draw(&mut a, 5);
    assert_eq!(batches_a, draw(&mut b, 5));
    assert_ne!(batches_a, draw(&mut c, 5));
}

#[test]
fn targets_are_inputs_shifted_by_one_within_each_row() {
    let tokens = counting_tokens(500);
    let mut loader = BatchLoader::new(tokens, Split::Train, 3, 16, 9).unwrap();
    for batch in draw(&mut loader, 10) {
        assert_eq!((batch.rows, batch.context), (3, 16));
        assert_eq!(batch.inputs.len(), 3 * 16);
        assert_eq!(batch.targets.len(), 3 * 16);
        for row in 0..3 {
            let inputs = &batch.inputs[row * 16..(row + 1) * 16];
            let targets = &batch.targets[row * 16..(row + 1) * 16];
            let start = inputs[0];
            assert!(start as usize + 16 < 500);
            assert_eq!(inputs, (start..start + 16).collect::<Vec<u32>>().as_slice());
            assert_eq!(
                targets,
                (start + 1..start + 17).collect::<Vec<u32>>().as_slice()
            );
        }
    }
}

#[test]
fn windows_cover_first_and_last_start_positions() {
    // 10 tokens, context 8: starts 0 and 1 are the only windows; both must appear.
    let mut loader = BatchLoader::new(counting_tokens(10), Split::Train, 1, 8, 3).unwrap();
    let starts: std::collections::BTreeSet<u32> =
        draw(&mut loader, 64).iter().map(|b| b.inputs[0]).collect();
    assert_eq!(starts.into_iter().collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn restore_resumes_the_same_sequence() {
    let tokens = counting_tokens(2000);
    let mut original = BatchLoader::new(tokens.clone(), Split::Train, 2, 32, 42).unwrap();
    draw(&mut original, 7);
    let state = original.state();
    assert_eq!(state.batches_drawn, 7);
    let json = serde_json::to_string(&state).unwrap();
    let expected = draw(&mut original, 5);

    let restored_state: LoaderState = serde_json::from_str(&json).unwrap();
    let mut resumed = BatchLoader::new(tokens.clone(), Split::Train, 2, 32, 0).unwrap();
    resumed.restore(&restored_state).unwrap();
    assert_eq!(draw(&mut resumed, 5), expected);
    assert_eq!(resumed.state(), original.state());

    let mut other_shape = BatchLoader::new(tokens, Split::Train, 4, 32, 42).unwrap();
    let err = other_shape.restore(&restored_state).unwrap_err();
    assert!(
        err.to_string().contains("same dataset, batch and context"),
        "{err}"
    );
}

#[test]
fn val_batches_are_deterministic_non_overlapping_windows_from_the_start() {
    let tokens = counting_tokens(100);
    // (100 - 1) / 10 = 9 windows -> 2 full batches of 4.
    let batches: Vec<Batch> = ValBatches::new(tokens.clone(), Split::Val, 4, 10, 100)
        .unwrap()
        .collect();
    assert_eq!(batches.len(), 2);
    let starts: Vec<u32> = batches
        .iter()
        .flat_map(|b| (0..4).map(move |r| b.inputs[r * 10]))
        .collect();
    assert_eq!(starts, vec![0, 10, 20, 30, 40, 50, 60, 70]);
    assert_eq!(batches[1].targets[39], 80);
    let again: Vec<Batch> = ValBatches::new(tokens.clone(), Split::Val, 4, 10, 100)
        .unwrap()
        .collect();
    assert_eq!(batches, again);
    assert_eq!(
        ValBatches::new(tokens, Split::Val, 4, 10, 1).unwrap().len(),
        1
    );
}

#[test]
fn split_shorter_than_context_plus_one_is_an_error_naming_split_and_sizes() {
    let err = BatchLoader::new(counting_tokens(8), Split::Train, 1, 8, 0).unwrap_err();
    assert!(
        err.to_string().contains("train split has 8 tokens"),
        "{err}"
    );
    assert!(err.to_string().contains("context + 1 = 9"), "{err}");
    let err = ValBatches::new(counting_tokens(30), Split::Val, 4, 10, 10).unwrap_err();
    assert!(
        err.to_string()
            .contains("val split has 30 tokens: 2 windows"),
        "{err}"
    );
}

#[test]
fn rank_rows_partition_the_global_batch() {
    let mut loader = BatchLoader::new(counting_tokens(300), Split::Train, 4, 5, 11).unwrap();
    let global = loader.next_batch();
    let shards: Vec<Batch> = (0..2)
        .map(|rank| global.rank_rows(rank, 2).unwrap())
        .collect();
    assert_eq!(shards[0].rows, 2);
    assert_eq!(
        [shards[0].inputs.as_slice(), shards[1].inputs.as_slice()].concat(),
        global.inputs
    );
    assert_eq!(
        [shards[0].targets.as_slice(), shards[1].targets.as_slice()].concat(),
        global.targets
    );
    assert_eq!(global.rank_rows(0, 1).unwrap(), global);
    assert!(global.rank_rows(0, 3).is_err());
    assert!(global.rank_rows(2, 2).is_err());
}

#[test]
fn dataset_loaders_draw_from_the_prepared_splits() {
    let inputs_dir = common::temp_dir("loader-ds-in");
    let text: String = (0..400)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let a = common::write_text(&inputs_dir, "a.txt", &text);
    let out = common::temp_dir("loader-ds-out");
    prepare(&[a], &out, TokenizerSpec::Char, 0.25).unwrap();
    let dataset = TokenDataset::open(&out).unwrap();
    assert_eq!(dataset.tokens(Split::Train).len(), 300);
    assert_eq!(dataset.tokens(Split::Val).len(), 100);
    let mut loader = dataset.loader(Split::Train, 2, 8, 5).unwrap();
    let batch = loader.next_batch();
    // Alphabet cycles: each target is the next letter (mod 26).
    assert!(batch
        .inputs
        .iter()
        .zip(&batch.targets)
        .all(|(&x, &y)| y == (x + 1) % 26));
    let val: Vec<Batch> = dataset.val_batches(2, 8, 3).unwrap().collect();
    assert_eq!(val.len(), 3);
    assert_eq!(val[0].inputs[..8], dataset.tokens(Split::Val)[..8]);
}
