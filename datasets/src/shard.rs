//! Token shards: the on-disk form of a tokenized split (`train.bin`, `val.bin`).
//!
//! Layout, all little-endian, in the spirit of llm.c's `.bin` token files:
//!
//! | bytes  | field                                            |
//! | ------ | ------------------------------------------------ |
//! | 0..8   | magic `b"ZCTOKENS"`                              |
//! | 8..12  | format version `u32` = 1                         |
//! | 12..16 | token width in bytes `u32`: 2 (u16) or 4 (u32)   |
//! | 16..20 | vocab size `u32`                                 |
//! | 20..24 | reserved `u32` = 0                               |
//! | 24..32 | token count `u64`                                |
//! | 32..   | `count` tokens of `width` bytes each             |
//!
//! The width is 2 whenever the vocabulary fits in a u16 (vocab size <= 65536), halving the file.
//! Writers go through `<path>.tmp` + rename; the reader checks every field and the exact file
//! size, so a truncated or foreign file is an error that names it instead of a silent bad run.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fsutil::{read_file, Staged};

/// First 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"ZCTOKENS";
/// The shard format version this build writes and reads.
pub const SHARD_FORMAT_VERSION: u32 = 1;
/// Size of the fixed header before the tokens.
pub const SHARD_HEADER_BYTES: usize = 32;

const FIX: &str = "re-run `zero-candle prepare` to rebuild the dataset";

/// The tokens of one split and the vocabulary size they were written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub tokens: Vec<u32>,
    pub vocab_size: usize,
}

/// Bytes per token on disk for a vocabulary: 2 when every id fits in a u16, else 4.
pub fn token_width_bytes(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Checks `tokens` against `vocab_size` and writes them as a shard at `path`, through
/// `<path>.tmp` and a rename, so no partial file ever appears under `path`.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    stage_shard(path, tokens, vocab_size)?.commit()
}

/// Writes and syncs `<path>.tmp` without renaming it (for `prepare`, which commits a whole
/// dataset at once).
pub(crate) fn stage_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<Staged> {
    let vocab_u32 = u32::try_from(vocab_size)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| {
            Error::at(
                path,
                format!("vocab size {vocab_size} must be in 1..=u32::MAX"),
            )
        })?;
    if let Some((index, token)) = tokens.iter().enumerate().find(|(_, &t)| t >= vocab_u32) {
        return Err(Error::at(
            path,
            format!("refusing to write token {token} at index {index}: not below vocab size {vocab_size}"),
        ));
    }
    let width = token_width_bytes(vocab_size);
    Staged::write(path, |w| {
        w.write_all(&SHARD_MAGIC)?;
        w.write_all(&SHARD_FORMAT_VERSION.to_le_bytes())?;
        w.write_all(&width.to_le_bytes())?;
        w.write_all(&vocab_u32.to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&(tokens.len() as u64).to_le_bytes())?;
        for &token in tokens {
            match width {
                // Checked above: token < vocab_size <= 65536.
                2 => w.write_all(&(token as u16).to_le_bytes())?,
                _ => w.write_all(&token.to_le_bytes())?,
            }
        }
        Ok(())
    })
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Reads and validates the shard at `path`: magic, version, token width, exact file size and
/// every token below the vocab size. Each error names the file, the problem and the fix.
pub fn read_shard(path: &Path) -> Result<Shard> {
    let bytes = read_file(path, "token shard", FIX)?;
    if bytes.is_empty() {
        return Err(Error::at(
            path,
            format!("token shard is empty (0 bytes), probably an interrupted write; {FIX}"),
        ));
    }
    if bytes.len() < SHARD_HEADER_BYTES {
        return Err(Error::at(
            path,
            format!(
                "token shard is {} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header; {FIX}",
                bytes.len()
            ),
        ));
    }
    if bytes[..8] != SHARD_MAGIC {
        return Err(Error::at(
            path,
            format!(
                "not a zero-candle token shard: magic is {:?}, expected \"ZCTOKENS\"; {FIX}",
                String::from_utf8_lossy(&bytes[..8])
            ),
        ));
    }
    let version = le_u32(&bytes, 8);
    if version != SHARD_FORMAT_VERSION {
        return Err(Error::at(
            path,
            format!("token shard format version {version}, this build reads version {SHARD_FORMAT_VERSION}; {FIX}"),
        ));
    }
    let width = le_u32(&bytes, 12);
    if width != 2 && width != 4 {
        return Err(Error::at(
            path,
            format!("token width {width} bytes is neither 2 (u16) nor 4 (u32); {FIX}"),
        ));
    }
    let vocab_size = le_u32(&bytes, 16) as usize;
    if vocab_size == 0 {
        return Err(Error::at(path, format!("header says vocab size 0; {FIX}")));
    }
    let count = le_u64(&bytes, 24);
    let expected = (count as u128) * (width as u128) + SHARD_HEADER_BYTES as u128;
    let actual = bytes.len() as u128;
    if actual != expected {
        let what = if actual < expected {
            format!("truncated: {} bytes missing", expected - actual)
        } else {
            format!("{} trailing bytes after the last token", actual - expected)
        };
        return Err(Error::at(
            path,
            format!(
                "token shard is {actual} bytes but its header promises {SHARD_HEADER_BYTES} + {count} tokens x {width} bytes = {expected} ({what}); {FIX}"
            ),
        ));
    }
    let body = &bytes[SHARD_HEADER_BYTES..];
    let tokens: Vec<u32> = match width {
        2 => body
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect(),
        _ => body
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    if let Some((index, token)) = tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab_size)
    {
        return Err(Error::at(
            path,
            format!("token {token} at index {index} is not below the vocab size {vocab_size} in the header; {FIX}"),
        ));
    }
    Ok(Shard { tokens, vocab_size })
}
