//! Public value types: image formats, image descriptions, guest extents and copy statistics.
//!
//! Contract: [`Extent`] (stagecore's own type) lists handed out by this crate are sorted by offset, non-overlapping and
//! merged (no two touch), which [`merge_extents`] guarantees.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use stagecore::Extent;

/// A disk image format this crate understands as a layer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// qcow2 (version 2 or 3).
    Qcow2,
    /// A raw image: the file's bytes are the guest's bytes.
    Raw,
}

impl ImageFormat {
    /// The name qemu uses for the format (`"qcow2"`, `"raw"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = stagecore::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            other => Err(stagecore::Error::invalid(
                "backing_format",
                format!("unsupported image format `{other}` (expected `qcow2` or `raw`)"),
            )),
        }
    }
}

/// What the header of one image (one layer) says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The image file, as it was opened (for backing files: resolved as qemu resolves them).
    pub path: PathBuf,
    /// The image format.
    pub format: ImageFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes (`None` for raw images).
    pub cluster_size: Option<u64>,
    /// The backing file, resolved against this image's directory when stored relative.
    pub backing_file: Option<PathBuf>,
    /// The backing format recorded in the header (`None`: not recorded, qemu would probe).
    pub backing_format: Option<ImageFormat>,
}

/// What [`crate::copy_allocated`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CopyStats {
    /// Source layers whose allocation was copied (top down to, excluding, `stop_at`).
    pub layers: usize,
    /// Guest bytes written as data clusters into the destination.
    pub data_bytes: u64,
    /// Guest bytes recorded as zero clusters (only when the destination keeps a backing file).
    pub zero_bytes: u64,
    /// Size of the destination file in bytes.
    pub file_size: u64,
    /// Of `data_bytes`, those shared with the source by reflink (FICLONERANGE) instead of
    /// copied: the filesystem supports it (XFS with reflink, btrfs) and the pieces are aligned.
    pub cloned_bytes: u64,
}

/// Sorts and merges overlapping or touching extents; drops empty ones.
pub(crate) fn merge_extents(v: Vec<Extent>) -> Vec<Extent> {
    stagecore::extent::normalize(v)
}

/// Appends `offset..offset+length` to a sorted list, merging with the last entry if they touch.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.end() == offset
    {
        last.length += length;
        return;
    }
    out.push(Extent { offset, length });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sorts_and_joins() {
        let e = |offset, length| Extent { offset, length };
        let merged = merge_extents(vec![e(10, 5), e(0, 4), e(4, 2), e(12, 10), e(30, 0)]);
        assert_eq!(merged, vec![e(0, 6), e(10, 12)]);
    }

    #[test]
    fn format_parses() {
        assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
        assert_eq!("raw".parse::<ImageFormat>().unwrap(), ImageFormat::Raw);
        assert!("vmdk".parse::<ImageFormat>().is_err());
    }
}
