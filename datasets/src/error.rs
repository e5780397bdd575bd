//! The crate's one error type: a message that says what went wrong and what to do, plus the
//! file it concerns when there is one. Kept as a plain struct (no `thiserror`) because every
//! failure here is "this file, this problem": callers print it, they rarely match on it.

use std::fmt;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error with the file it concerns (if any) and a message that says what is wrong and what
/// to do about it. `Display` prints `<path>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    path: Option<PathBuf>,
    message: String,
}

impl Error {
    /// An error not tied to one file (bad argument, bad batch shape, ...).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            path: None,
            message: message.into(),
        }
    }

    /// An error about the file or folder at `path`.
    pub fn at(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self {
            path: Some(path.as_ref().to_path_buf()),
            message: message.into(),
        }
    }

    /// The file or folder this error concerns, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The message without the path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(path) => write!(f, "{}: {}", path.display(), self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}
