//! Metrics as JSON lines in `<out_dir>/metrics.jsonl`: one object per record, flushed as written,
//! so a crashed run still has its history and any tool (jq, pandas) can read it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct MetricsWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl MetricsWriter {
    /// Create (truncate) `<dir>/metrics.jsonl`, or append to it (a resumed run).
    pub fn open(dir: &Path, append: bool) -> std::io::Result<Self> {
        let path = dir.join("metrics.jsonl");
        let file = OpenOptions::new().create(true).write(true).append(append).truncate(!append).open(&path)?;
        Ok(Self { path, file: BufWriter::new(file) })
    }

    pub fn write(&mut self, record: serde_json::Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.file, &record)?;
        self.file.write_all(b"\n")?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
