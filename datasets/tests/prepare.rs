//! `prepare`: shards, tokenizer and meta.json with the right counts; validation takes the end
//! of every file; bad inputs are errors naming the file and leave no dataset behind.

mod common;

use datasets::{prepare, read_shard, Split, TokenDataset, TokenizerKind, TokenizerSpec};
use std::path::PathBuf;

#[test]
fn prepare_char_writes_shards_and_meta_with_val_from_each_file() {
    let inputs_dir = common::temp_dir("prep-char-in");
    let out = common::temp_dir("prep-char-out").join("dataset");
    // 20 and 10 characters: val = round(0.1 * n) = 2 and 1 tokens, from the end of each file.
    let a = common::write_text(&inputs_dir, "a.txt", "abcdefghijabcdefghXY");
    let b = common::write_text(&inputs_dir, "b.txt", "0123456789");
    let summary = prepare(&[a, b], &out, TokenizerSpec::Char, 0.1).unwrap();

    let meta = &summary.meta;
    assert_eq!(meta.tokenizer, TokenizerKind::Char);
    assert_eq!(meta.vocab_size, 22); // a..j (10) + X, Y + 0..9 (10)
    assert_eq!((meta.train_tokens, meta.val_tokens), (27, 3));
    assert_eq!(meta.sources.len(), 2);
    assert_eq!(
        (
            meta.sources[0].bytes,
            meta.sources[0].train_tokens,
            meta.sources[0].val_tokens
        ),
        (20, 18, 2)
    );
    assert_eq!(
        (
            meta.sources[1].bytes,
            meta.sources[1].train_tokens,
            meta.sources[1].val_tokens
        ),
        (10, 9, 1)
    );

    for name in ["train.bin", "val.bin", "vocab.json", "meta.json"] {
        assert!(out.join(name).is_file(), "{name} missing");
        assert!(
            !out.join(format!("{name}.tmp")).exists(),
            "{name}.tmp left behind"
        );
    }
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(on_disk["format_version"], 1);
    assert_eq!(on_disk["tokenizer"], "char");
    assert_eq!(on_disk["train_tokens"], 27);
    assert_eq!(on_disk["val_tokens"], 3);
    assert_eq!(on_disk["sources"][1]["bytes"], 10);

    let dataset = TokenDataset::open(&out).unwrap();
    let tokenizer = dataset.tokenizer();
    assert_eq!(tokenizer.decode(dataset.tokens(Split::Val)).unwrap(), "XY9");
    assert_eq!(
        tokenizer.decode(dataset.tokens(Split::Train)).unwrap(),
        "abcdefghijabcdefgh012345678"
    );
    assert_eq!(read_shard(&out.join("val.bin")).unwrap().tokens.len(), 3);
}

#[test]
fn prepare_takes_folder_txt_files_in_sorted_order() {
    let inputs_dir = common::temp_dir("prep-folder-in");
    common::write_text(&inputs_dir, "2.txt", "bbbb");
    common::write_text(&inputs_dir, "1.txt", "aaaa");
    common::write_text(&inputs_dir, "notes.md", "ignored");
    let out = common::temp_dir("prep-folder-out");
    let summary = prepare(
        std::slice::from_ref(&inputs_dir),
        &out,
        TokenizerSpec::Char,
        0.25,
    )
    .unwrap();
    let names: Vec<&str> = summary
        .meta
        .sources
        .iter()
        .map(|s| s.path.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(names, ["1.txt", "2.txt"]);
    let dataset = TokenDataset::open(&out).unwrap();
    assert_eq!(
        dataset
            .tokenizer()
            .decode(dataset.tokens(Split::Train))
            .unwrap(),
        "aaabbb"
    );
    assert_eq!(
        dataset
            .tokenizer()
            .decode(dataset.tokens(Split::Val))
            .unwrap(),
        "ab"
    );
}

#[test]
fn prepare_huggingface_copies_tokenizer_json_byte_for_byte() {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/smollm2-135m-instruct/tokenizer.json");
    assert!(
        source.is_file(),
        "SmolLM2 tokenizer missing: expected {}",
        source.display()
    );
    let inputs_dir = common::temp_dir("prep-hf-in");
    let a = common::write_text(
        &inputs_dir,
        "a.txt",
        "The capital of France is Paris. The capital of Italy is Rome.",
    );
    let b = common::write_text(
        &inputs_dir,
        "b.txt",
        "Once upon a time there was a little robot.",
    );
    let out = common::temp_dir("prep-hf-out");
    let summary = prepare(
        &[a, b],
        &out,
        TokenizerSpec::HuggingFace(source.clone()),
        0.2,
    )
    .unwrap();
    assert_eq!(summary.meta.tokenizer, TokenizerKind::HuggingFace);
    assert_eq!(summary.meta.vocab_size, 49152);
    assert!(summary
        .meta
        .sources
        .iter()
        .all(|s| s.val_tokens >= 1 && s.train_tokens > s.val_tokens));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(&source).unwrap()
    );
    let dataset = TokenDataset::open(&out).unwrap();
    let total = dataset.tokens(Split::Train).len() + dataset.tokens(Split::Val).len();
    assert_eq!(
        total as u64,
        summary.meta.train_tokens + summary.meta.val_tokens
    );
    assert!(dataset
        .tokenizer()
        .decode(dataset.tokens(Split::Val))
        .unwrap()
        .ends_with("robot."));
}

#[test]
fn prepare_rejects_missing_empty_and_non_utf8_inputs_naming_the_file() {
    let inputs_dir = common::temp_dir("prep-bad-in");
    let good = common::write_text(&inputs_dir, "good.txt", "hello");
    let empty = common::write_text(&inputs_dir, "empty.txt", "");
    let binary = inputs_dir.join("binary.txt");
    std::fs::write(&binary, [b'o', b'k', 0xff, 0xfe]).unwrap();
    let missing = inputs_dir.join("missing.txt");
    let out = common::temp_dir("prep-bad-out").join("dataset");
    for (bad, needle) in [
        (&missing, "not found"),
        (&empty, "empty"),
        (&binary, "not valid UTF-8 (first bad byte at offset 2)"),
    ] {
        let err =
            prepare(&[good.clone(), bad.clone()], &out, TokenizerSpec::Char, 0.1).unwrap_err();
        assert_eq!(err.path(), Some(bad.as_path()), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(!out.join("meta.json").exists());
        assert!(!out.join("train.bin").exists());
    }
    let err = prepare(std::slice::from_ref(&good), &out, TokenizerSpec::Char, 1.0).unwrap_err();
    assert!(err.to_string().contains("val_fraction"), "{err}");
    let err = prepare(&[good.clone(), good], &out, TokenizerSpec::Char, 0.1).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
}

#[test]
fn open_names_missing_or_mismatched_files_and_says_to_run_prepare() {
    let inputs_dir = common::temp_dir("prep-open-in");
    let a = common::write_text(&inputs_dir, "a.txt", "abcdefghijklmnopqrstuvwxyz");
    let out = common::temp_dir("prep-open-out");
    prepare(std::slice::from_ref(&a), &out, TokenizerSpec::Char, 0.2).unwrap();

    let err = TokenDataset::open(&out.join("nowhere")).unwrap_err();
    assert!(err.to_string().contains("zero-candle prepare"), "{err}");

    std::fs::remove_file(out.join("val.bin")).unwrap();
    let err = TokenDataset::open(&out).unwrap_err();
    assert_eq!(err.path(), Some(out.join("val.bin").as_path()));
    assert!(err.to_string().contains("zero-candle prepare"), "{err}");

    // A shard from another run (different token count) is caught against meta.json.
    datasets::write_shard(&out.join("val.bin"), &[1, 2], 26).unwrap();
    let err = TokenDataset::open(&out).unwrap_err();
    assert_eq!(err.path(), Some(out.join("val.bin").as_path()));
    assert!(err.to_string().contains("meta.json says 5 tokens"), "{err}");

    std::fs::remove_file(out.join("meta.json")).unwrap();
    let err = TokenDataset::open(&out).unwrap_err();
    assert_eq!(err.path(), Some(out.join("meta.json").as_path()));
}

#[test]
fn prepare_again_replaces_the_dataset_completely() {
    let inputs_dir = common::temp_dir("prep-again-in");
    let a = common::write_text(&inputs_dir, "a.txt", "aaaaaaaaaa");
    let b = common::write_text(&inputs_dir, "b.txt", "bcbcbcbcbcbcbcbcbcbc");
    let out = common::temp_dir("prep-again-out");
    prepare(&[a], &out, TokenizerSpec::Char, 0.1).unwrap();
    let summary = prepare(&[b], &out, TokenizerSpec::Char, 0.1).unwrap();
    assert_eq!(
        (summary.meta.train_tokens, summary.meta.val_tokens),
        (18, 2)
    );
    let dataset = TokenDataset::open(&out).unwrap();
    assert_eq!(dataset.vocab_size(), 2);
    assert_eq!(
        dataset
            .tokenizer()
            .decode(dataset.tokens(Split::Val))
            .unwrap(),
        "bc"
    );
}
