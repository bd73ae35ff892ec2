//! Durable records: [`write_atomic`] (temporary file, fsync, rename, directory fsync) and
//! [`RecordFile`], a JSON file holding one record. A reader sees the old or the new record,
//! never a torn one, and a record that was written survives a power loss.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Writes `data` to `path` through a temporary file in the same directory: write, fsync,
/// rename over `path`, fsync the directory. On failure the temporary file is removed and
/// `path` is as it was.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("record");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

/// A JSON file holding one record of kind `kind` (e.g. `environment`).
#[derive(Debug, Clone)]
pub struct RecordFile {
    kind: &'static str,
    path: PathBuf,
}

impl RecordFile {
    /// The record file at `path`; `kind` names what it holds in `NotFound` errors.
    pub fn new(kind: &'static str, path: impl Into<PathBuf>) -> Self {
        RecordFile { kind, path: path.into() }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Reads the record; `NotFound` naming `name` when there is no file, `Error::Core` naming
    /// the file when it is not a valid record.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found_because(self.kind, name, e));
            }
            Err(e) => return Err(Error::io("reading", &self.path, e)),
        };
        serde_json::from_slice(&text)
            .map_err(|e| Error::core("toolbox", format!("corrupt {} record {}: {e}", self.kind, self.path.display())))
    }

    /// Writes the record durably ([`write_atomic`]).
    pub fn save<T: Serialize>(&self, record: &T) -> Result<()> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::core("toolbox", format!("serialising a {} record: {e}", self.kind)))?;
        write_atomic(&self.path, &text)
    }
}
