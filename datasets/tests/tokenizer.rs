//! Tokenizers: the character tokenizer round trips and rejects unknown characters; the SmolLM2
//! Hugging Face tokenizer loads and round trips; both save and load beside the shards.

mod common;

use datasets::{CharTokenizer, Tokenizer, TokenizerKind};
use std::path::PathBuf;

#[test]
fn char_tokenizer_vocab_is_sorted_unique_chars_and_round_trips() {
    let text = "hello world\n";
    let tokenizer = CharTokenizer::from_text(text).unwrap();
    assert_eq!(
        tokenizer.chars(),
        &['\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
    );
    assert_eq!(tokenizer.vocab_size(), 9);
    let ids = tokenizer.encode("hello").unwrap();
    assert_eq!(ids, vec![4, 3, 5, 5, 6]);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "hello");
    let wrapped = Tokenizer::Char(tokenizer);
    assert_eq!(
        wrapped.decode(&wrapped.encode(text).unwrap()).unwrap(),
        text
    );
}

#[test]
fn char_tokenizer_unknown_char_error_names_the_char() {
    let tokenizer = CharTokenizer::from_text("abc").unwrap();
    let err = tokenizer.encode("abz").unwrap_err();
    assert!(err.to_string().contains("'z'"), "{err}");
    assert!(err.to_string().contains("at character 2"), "{err}");
    let err = tokenizer.decode(&[0, 3]).unwrap_err();
    assert!(err.to_string().contains("token id 3"), "{err}");
}

#[test]
fn char_tokenizer_handles_multibyte_chars() {
    let tokenizer = CharTokenizer::from_text("naïve café ☕").unwrap();
    let ids = tokenizer.encode("café ☕").unwrap();
    assert_eq!(ids.len(), 6);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "café ☕");
}

#[test]
fn char_tokenizer_saves_and_loads_from_dataset_folder() {
    let dir = common::temp_dir("tok-char-save");
    let tokenizer = Tokenizer::Char(CharTokenizer::from_text("To be, or not to be").unwrap());
    let path = tokenizer.save(&dir).unwrap();
    assert_eq!(path, dir.join("vocab.json"));
    let loaded = Tokenizer::load(&dir, TokenizerKind::Char).unwrap();
    assert_eq!(loaded.vocab_size(), tokenizer.vocab_size());
    assert_eq!(
        loaded.encode("not to be").unwrap(),
        tokenizer.encode("not to be").unwrap()
    );
}

#[test]
fn loading_missing_or_corrupt_vocab_names_the_file() {
    let dir = common::temp_dir("tok-char-corrupt");
    let err = Tokenizer::load(&dir, TokenizerKind::Char).unwrap_err();
    assert_eq!(err.path(), Some(dir.join("vocab.json").as_path()));
    assert!(err.to_string().contains("zero-candle prepare"), "{err}");
    std::fs::write(
        dir.join("vocab.json"),
        "{\"kind\": \"char\", \"chars\": [\"b\", \"a\"]}",
    )
    .unwrap();
    let err = Tokenizer::load(&dir, TokenizerKind::Char).unwrap_err();
    assert!(err.to_string().contains("sorted and unique"), "{err}");
    assert_eq!(err.path(), Some(dir.join("vocab.json").as_path()));
}

fn smollm2_tokenizer_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/smollm2-135m-instruct/tokenizer.json");
    assert!(
        path.is_file(),
        "SmolLM2 tokenizer missing: expected {}",
        path.display()
    );
    path
}

#[test]
fn huggingface_smollm2_tokenizer_round_trips_known_prompt() {
    let tokenizer = Tokenizer::from_huggingface_file(&smollm2_tokenizer_path()).unwrap();
    assert_eq!(tokenizer.kind(), TokenizerKind::HuggingFace);
    assert_eq!(tokenizer.vocab_size(), 49152);
    let text = "The capital of France is";
    let ids = tokenizer.encode(text).unwrap();
    // GPT-2 style BPE: one token per word ("The", " capital", " of", " France", " is").
    assert_eq!(ids.len(), 5, "ids: {ids:?}");
    assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    let err = tokenizer.decode(&[49152]).unwrap_err();
    assert!(err.to_string().contains("49152"), "{err}");
}

#[test]
fn huggingface_tokenizer_saves_and_loads_from_dataset_folder() {
    let dir = common::temp_dir("tok-hf-save");
    let tokenizer = Tokenizer::from_huggingface_file(&smollm2_tokenizer_path()).unwrap();
    assert_eq!(tokenizer.save(&dir).unwrap(), dir.join("tokenizer.json"));
    let loaded = Tokenizer::load(&dir, TokenizerKind::HuggingFace).unwrap();
    let text = "Hello, world! 12345";
    assert_eq!(
        loaded.encode(text).unwrap(),
        tokenizer.encode(text).unwrap()
    );
}

#[test]
fn missing_huggingface_tokenizer_error_names_the_file() {
    let dir = common::temp_dir("tok-hf-missing");
    let path = dir.join("nope.json");
    let err = Tokenizer::from_huggingface_file(&path).unwrap_err();
    assert_eq!(err.path(), Some(path.as_path()));
}
