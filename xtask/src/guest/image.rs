//! The disk: an ext4 filesystem on the whole disk made from the rootfs directory by
//! `mke2fs -d` (no loop mount), inode tables and journal initialised now (GUEST.md pitfall 3:
//! otherwise every guest runs ext4lazyinit and writes into its overlay), then converted to an
//! uncompressed qcow2 (zero clusters stay unallocated). If that came out above
//! [`COMPRESS_ABOVE`] it is converted again with zlib compression (never zstd: the project's
//! qcow2 reader cannot read zstd clusters).

use std::fs;
use std::path::Path;
use std::process::Command;

use super::checked;
use crate::run::{Failure, Result};

/// Virtual size of the guest disk.
pub(crate) const DISK_SIZE: &str = "512M";

/// Virtual size in bytes (matches [`DISK_SIZE`]).
pub(crate) const DISK_BYTES: u64 = 512 << 20;

/// Above this allocated size the base is written zlib-compressed instead.
pub(crate) const COMPRESS_ABOVE: u64 = 200_000_000;

/// How the base image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// Plain clusters (the default: fastest to read).
    None,
    /// zlib-compressed clusters (only when the plain image is too large).
    Zlib,
}

impl Compression {
    /// Name for the manifest.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
        }
    }
}

/// Makes `out` (qcow2) from the rootfs `dir`, using `raw` as the scratch raw image (removed).
pub(crate) fn build(dir: &Path, raw: &Path, out: &Path) -> Result<Compression> {
    checked(
        "mke2fs -d",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "guestroot", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
            .arg(dir)
            .arg(raw)
            .arg(DISK_SIZE),
    )?;
    let convert = |compress: bool| {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-f", "raw", "-O", "qcow2"]);
        if compress {
            cmd.args(["-c", "-o", "compression_type=zlib"]);
        }
        cmd.arg(raw).arg(out);
        checked("qemu-img convert", &mut cmd)
    };
    convert(false)?;
    let mut compression = Compression::None;
    let size = fs::metadata(out).map_err(|e| Failure(format!("guest-image: stat {}: {e}", out.display())))?.len();
    if size > COMPRESS_ABOVE {
        println!("guest-image: uncompressed base is {size} bytes (> {COMPRESS_ABOVE}); writing it zlib-compressed");
        fs::remove_file(out).map_err(|e| Failure(format!("guest-image: remove {}: {e}", out.display())))?;
        convert(true)?;
        compression = Compression::Zlib;
    }
    fs::remove_file(raw).map_err(|e| Failure(format!("guest-image: remove {}: {e}", raw.display())))?;
    Ok(compression)
}
