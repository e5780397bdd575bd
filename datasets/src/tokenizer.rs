//! Tokenizers that turn text into the token ids stored in shards, and back.
//!
//! Two kinds: a character-level tokenizer (vocabulary = the sorted unique characters of the
//! corpus, as in nanoGPT's `shakespeare_char`) for tiny from-scratch runs, and a Hugging Face
//! `tokenizer.json` (e.g. SmolLM2's BPE) for anything that must match a pretrained model.
//! Each is saved beside the shards (`vocab.json` or `tokenizer.json`) so a dataset folder is
//! self-contained: `meta.json` names the kind, and `Tokenizer::load` reads the matching file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{read_file, write_atomic};

/// File name of a saved character vocabulary inside a dataset folder.
pub const CHAR_VOCAB_FILE: &str = "vocab.json";
/// File name of a saved Hugging Face tokenizer inside a dataset folder.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

const FIX: &str = "re-run `zero-candle prepare` to rebuild the dataset";

/// Which tokenizer a dataset uses; recorded in `meta.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Char,
    HuggingFace,
}

impl TokenizerKind {
    /// The file, inside a dataset folder, that holds this kind of tokenizer.
    pub fn file_name(self) -> &'static str {
        match self {
            TokenizerKind::Char => CHAR_VOCAB_FILE,
            TokenizerKind::HuggingFace => HF_TOKENIZER_FILE,
        }
    }
}

/// Character-level tokenizer: id `i` is the `i`-th smallest character of the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

/// On-disk form of a `CharTokenizer` (`vocab.json`).
#[derive(Serialize, Deserialize)]
struct CharVocabFile {
    kind: TokenizerKind,
    chars: Vec<char>,
}

impl CharTokenizer {
    /// Vocabulary = the sorted unique characters of `text`. Empty text is an error.
    pub fn from_text(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A tokenizer over `chars`, which must be non-empty, sorted and unique.
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        if chars.is_empty() {
            return Err(Error::new(
                "a character vocabulary needs at least one character",
            ));
        }
        if let Some(pair) = chars.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(Error::new(format!(
                "character vocabulary must be sorted and unique, found {:?} before {:?}",
                pair[0], pair[1]
            )));
        }
        let ids = chars
            .iter()
            .enumerate()
            .map(|(id, &c)| (c, id as u32))
            .collect();
        Ok(Self { chars, ids })
    }

    /// The vocabulary, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// One id per character; a character outside the vocabulary is an error naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(position, c)| {
                self.ids.get(&c).copied().ok_or_else(|| {
                    Error::new(format!(
                        "character {c:?} (U+{:04X}) at character {position} is not in the {}-character vocabulary",
                        c as u32,
                        self.chars.len()
                    ))
                })
            })
            .collect()
    }

    /// The characters for `ids`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&id| {
                self.chars.get(id as usize).copied().ok_or_else(|| {
                    Error::new(format!(
                        "token id {id} is outside the {}-character vocabulary",
                        self.chars.len()
                    ))
                })
            })
            .collect()
    }
}

/// A tokenizer of either kind.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    Char(CharTokenizer),
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` from any path.
    pub fn from_huggingface_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::at(
                path,
                "tokenizer.json not found; pass the path of a Hugging Face tokenizer.json",
            ));
        }
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::at(
                path,
                format!("cannot load as a Hugging Face tokenizer.json: {e}"),
            )
        })?;
        Ok(Tokenizer::HuggingFace(Box::new(tokenizer)))
    }

    pub fn kind(&self) -> TokenizerKind {
        match self {
            Tokenizer::Char(_) => TokenizerKind::Char,
            Tokenizer::HuggingFace(_) => TokenizerKind::HuggingFace,
        }
    }

    /// Number of token ids, including a Hugging Face tokenizer's added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// Token ids for `text`. Hugging Face tokenizers add no special tokens (BOS/EOS): datasets
    /// are raw token streams.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::HuggingFace(t) => t
                .encode(text, false)
                .map(|encoding| encoding.get_ids().to_vec())
                .map_err(|e| Error::new(format!("Hugging Face tokenizer failed to encode: {e}"))),
        }
    }

    /// Text for `ids`; ids at or above `vocab_size()` are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char(t) => t.decode(ids),
            Tokenizer::HuggingFace(t) => {
                let vocab_size = t.get_vocab_size(true);
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(Error::new(format!(
                        "token id {id} is outside the vocabulary of {vocab_size}"
                    )));
                }
                t.decode(ids, false).map_err(|e| {
                    Error::new(format!("Hugging Face tokenizer failed to decode: {e}"))
                })
            }
        }
    }

    /// Saves the tokenizer into `dir` under `kind().file_name()` (atomically); returns the path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(self.kind().file_name());
        write_atomic(&path, &self.to_json_bytes(&path)?)?;
        Ok(path)
    }

    /// Loads the tokenizer of `kind` saved in the dataset folder `dir`.
    pub fn load(dir: &Path, kind: TokenizerKind) -> Result<Self> {
        let path = dir.join(kind.file_name());
        match kind {
            TokenizerKind::Char => {
                let bytes = read_file(&path, "character vocabulary", FIX)?;
                let file: CharVocabFile = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::at(&path, format!("corrupt character vocabulary: {e}; {FIX}"))
                })?;
                if file.kind != TokenizerKind::Char {
                    return Err(Error::at(
                        &path,
                        format!("expected kind \"char\", found {:?}; {FIX}", file.kind),
                    ));
                }
                let tokenizer = CharTokenizer::from_chars(file.chars)
                    .map_err(|e| Error::at(&path, format!("{}; {FIX}", e.message())))?;
                Ok(Tokenizer::Char(tokenizer))
            }
            TokenizerKind::HuggingFace => {
                if !path.is_file() {
                    return Err(Error::at(
                        &path,
                        format!("Hugging Face tokenizer not found; {FIX}"),
                    ));
                }
                Self::from_huggingface_file(&path)
                    .map_err(|e| Error::at(&path, format!("{}; {FIX}", e.message())))
            }
        }
    }

    /// The bytes `save` writes; `path` only names the file in errors.
    pub(crate) fn to_json_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        match self {
            Tokenizer::Char(t) => {
                let file = CharVocabFile {
                    kind: TokenizerKind::Char,
                    chars: t.chars.clone(),
                };
                serde_json::to_vec_pretty(&file).map_err(|e| {
                    Error::at(
                        path,
                        format!("cannot serialize the character vocabulary: {e}"),
                    )
                })
            }
            Tokenizer::HuggingFace(t) => t.to_string(false).map(String::into_bytes).map_err(|e| {
                Error::at(
                    path,
                    format!("cannot serialize the Hugging Face tokenizer: {e}"),
                )
            }),
        }
    }
}
