//! Crash-safe file writing: every file this crate produces is written under `<name>.tmp`,
//! flushed to disk, then renamed, so a reader never sees a half-written file under the final
//! name. `Staged` splits the two steps so `prepare` can write a whole dataset before committing
//! any of it.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `<path>.tmp`, beside `path`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

/// A file fully written and synced under its temporary name, waiting to be renamed.
#[derive(Debug)]
pub(crate) struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

impl Staged {
    /// Writes `<path>.tmp` with `fill` and syncs it; the final name is untouched until `commit`.
    pub(crate) fn write(
        path: &Path,
        fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
    ) -> Result<Self> {
        let tmp = tmp_path(path);
        let fail = |e: std::io::Error| {
            Error::at(
                &tmp,
                format!("cannot write temporary file: {e}; check free disk space and permissions"),
            )
        };
        let file = File::create(&tmp).map_err(fail)?;
        let mut writer = BufWriter::new(file);
        let written = fill(&mut writer)
            .and_then(|()| writer.flush())
            .and_then(|()| writer.get_ref().sync_all());
        if let Err(e) = written {
            drop(writer);
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// Renames the temporary file onto the final name (atomic on one filesystem).
    pub(crate) fn commit(self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| {
            Error::at(
                &self.path,
                format!("cannot rename {} onto it: {e}", self.tmp.display()),
            )
        })
    }

    /// Removes the temporary file (used when a later step of the same job failed).
    pub(crate) fn discard(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Staged::write(path, |w| w.write_all(bytes))?.commit()
}

/// Reads a whole file, with errors that name it: `what` says what the file is for and `fix`
/// what to do when it is missing (e.g. "run `zero-candle prepare`").
pub(crate) fn read_file(path: &Path, what: &str, fix: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::at(path, format!("{what} not found; {fix}")),
        _ => Error::at(path, format!("cannot read {what}: {e}")),
    })
}
