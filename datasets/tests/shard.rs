//! Token shard format: round trips at both token widths, and every kind of corruption is an
//! error that names the file.

mod common;

use datasets::{read_shard, token_width_bytes, write_shard, Shard, SHARD_HEADER_BYTES};
use std::path::Path;

fn assert_error_names_file(path: &Path, needle: &str) {
    let err = read_shard(path).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "error does not name the file: {text}"
    );
    assert!(
        text.contains(needle),
        "error {text:?} does not mention {needle:?}"
    );
    assert!(
        text.contains("zero-candle prepare"),
        "error does not say what to do: {text}"
    );
    assert_eq!(err.path(), Some(path));
}

#[test]
fn shard_round_trips_u16_tokens_in_two_bytes_each() {
    let dir = common::temp_dir("shard-u16");
    let path = dir.join("train.bin");
    let tokens: Vec<u32> = vec![0, 1, 65535, 42, 7, 65535];
    write_shard(&path, &tokens, 65536).unwrap();
    assert_eq!(token_width_bytes(65536), 2);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        SHARD_HEADER_BYTES + 2 * tokens.len()
    );
    assert_eq!(
        read_shard(&path).unwrap(),
        Shard {
            tokens,
            vocab_size: 65536
        }
    );
    assert!(!dir.join("train.bin.tmp").exists());
}

#[test]
fn shard_round_trips_u32_tokens_in_four_bytes_each() {
    let dir = common::temp_dir("shard-u32");
    let path = dir.join("train.bin");
    let tokens: Vec<u32> = vec![0, 65536, 99_999, 3];
    write_shard(&path, &tokens, 100_000).unwrap();
    assert_eq!(token_width_bytes(65537), 4);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len() as usize,
        SHARD_HEADER_BYTES + 4 * tokens.len()
    );
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"ZCTOKENS");
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 4);
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 4);
    assert_eq!(
        read_shard(&path).unwrap(),
        Shard {
            tokens,
            vocab_size: 100_000
        }
    );
}

#[test]
fn empty_token_list_round_trips() {
    let dir = common::temp_dir("shard-empty-list");
    let path = dir.join("val.bin");
    write_shard(&path, &[], 10).unwrap();
    assert_eq!(
        read_shard(&path).unwrap(),
        Shard {
            tokens: vec![],
            vocab_size: 10
        }
    );
}

#[test]
fn write_refuses_token_at_or_above_vocab_and_leaves_no_file() {
    let dir = common::temp_dir("shard-write-bad");
    let path = dir.join("train.bin");
    let err = write_shard(&path, &[1, 2, 10], 10).unwrap_err();
    assert!(err.to_string().contains("token 10 at index 2"), "{err}");
    assert!(!path.exists());
    assert!(!dir.join("train.bin.tmp").exists());
}

#[test]
fn missing_shard_error_names_file() {
    let dir = common::temp_dir("shard-missing");
    assert_error_names_file(&dir.join("train.bin"), "not found");
}

#[test]
fn empty_shard_error_names_file() {
    let dir = common::temp_dir("shard-empty");
    let path = dir.join("train.bin");
    std::fs::write(&path, b"").unwrap();
    assert_error_names_file(&path, "empty");
}

#[test]
fn shard_shorter_than_header_error_names_file() {
    let dir = common::temp_dir("shard-short");
    let path = dir.join("train.bin");
    std::fs::write(&path, b"ZCTOKENS\x01\x00").unwrap();
    assert_error_names_file(&path, "shorter than the 32-byte header");
}

#[test]
fn truncated_shard_error_names_file() {
    let dir = common::temp_dir("shard-truncated");
    let path = dir.join("train.bin");
    write_shard(&path, &[1, 2, 3, 4], 10).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert_error_names_file(&path, "truncated: 3 bytes missing");
}

#[test]
fn shard_with_trailing_bytes_error_names_file() {
    let dir = common::temp_dir("shard-trailing");
    let path = dir.join("train.bin");
    write_shard(&path, &[1, 2, 3, 4], 10).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0, 0]);
    std::fs::write(&path, &bytes).unwrap();
    assert_error_names_file(&path, "2 trailing bytes");
}

#[test]
fn shard_with_bad_magic_error_names_file() {
    let dir = common::temp_dir("shard-magic");
    let path = dir.join("train.bin");
    write_shard(&path, &[1, 2], 10).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(b"NOTTOKEN");
    std::fs::write(&path, &bytes).unwrap();
    assert_error_names_file(&path, "not a zero-candle token shard");
}

#[test]
fn shard_with_unknown_version_or_width_error_names_file() {
    let dir = common::temp_dir("shard-version");
    let path = dir.join("train.bin");
    write_shard(&path, &[1, 2], 10).unwrap();
    let good = std::fs::read(&path).unwrap();
    let mut bytes = good.clone();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_error_names_file(&path, "format version 2");
    let mut bytes = good;
    bytes[12..16].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_error_names_file(&path, "token width 3");
}

#[test]
fn shard_with_token_at_or_above_vocab_error_names_file() {
    let dir = common::temp_dir("shard-vocab");
    let path = dir.join("train.bin");
    write_shard(&path, &[1, 2, 3], 10).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Third token (index 2) becomes 12, above the vocab size of 10.
    bytes[SHARD_HEADER_BYTES + 4..SHARD_HEADER_BYTES + 6].copy_from_slice(&12u16.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_error_names_file(&path, "token 12 at index 2");
}
