//! The audit archive: one pretty-printed JSON [`Receipt`] per promotion,
//! `<state_dir>/receipts/<promotion-id>.json`, written atomically and never changed afterwards.

use std::path::{Path, PathBuf};

use super::fsutil::{blocking, io_err, write_atomic};
use super::types::Receipt;
use crate::{Error, Result};

/// Writes `receipt` into the archive under `dir` (replacing an earlier write of the same id,
/// which happens only when recovery redoes an interrupted finish).
pub(crate) async fn store(dir: &Path, receipt: &Receipt) -> Result<()> {
    let path = dir.join(format!("{}.json", receipt.id));
    let json = serde_json::to_vec_pretty(receipt).map_err(|e| Error::backend("promotion", e))?;
    blocking(move || write_atomic(&path, &json)).await
}

/// Every receipt in the archive under `dir`, oldest first (by start time, then id).
pub(crate) async fn list(dir: PathBuf) -> Result<Vec<Receipt>> {
    blocking(move || {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, "list", e))? {
            let path = entry.map_err(|e| io_err(&dir, "list", e))?.path();
            let is_receipt = path.extension().is_some_and(|x| x == "json")
                && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
            if !is_receipt {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, "read", e))?;
            let receipt: Receipt = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(path.display().to_string(), format!("not a receipt: {e}")))?;
            out.push(receipt);
        }
        out.sort_by(|a: &Receipt, b: &Receipt| a.started_at.cmp(&b.started_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    })
    .await
}
