//! Byte sources behind layers: local files (the default) or anything that can read at an offset,
//! such as a remote storage volume read through a libvirt stream.
//!
//! Contract: [`ReadAt::read_exact_at`] fills the whole buffer or fails (`UnexpectedEof` when the
//! source is shorter); [`ReadAt::size`] is the current length in bytes. Writes are optional
//! (read-only sources keep the defaults, which fail with `Unsupported`). A [`Resolver`] opens the
//! top image and every backing file by the path the chain names; functions given a resolver never
//! touch the local filesystem.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Positional reads (and optionally writes) of one image's bytes.
pub trait ReadAt: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The length in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Writes all of `data` at `offset` (the default refuses: read-only source).
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _ = (data, offset);
        Err(io::Error::new(io::ErrorKind::Unsupported, "read-only source"))
    }

    /// Extends (or truncates) the source to `len` bytes (the default refuses: read-only source).
    fn set_len(&self, len: u64) -> io::Result<()> {
        let _ = len;
        Err(io::Error::new(io::ErrorKind::Unsupported, "read-only source"))
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Opens images by path: the top image and each backing file as the chain names it (relative
/// names are resolved against the naming image's directory first, as qemu does).
pub trait Resolver: Send + Sync {
    /// Opens `path`, for writing when `write` (only ever the top image). A missing image must be
    /// an error of kind `NotFound`.
    fn open(&self, path: &Path, write: bool) -> io::Result<Box<dyn ReadAt>>;
}

/// What a layer reads from.
pub(crate) enum Source {
    /// A local file (identity by device and inode; `copy_file_range` and `SEEK_DATA` work).
    File(File),
    /// A source opened by a [`Resolver`] (identity by path).
    Other(Box<dyn ReadAt>),
}

impl Source {
    fn inner(&self) -> &dyn ReadAt {
        match self {
            Source::File(f) => f,
            Source::Other(o) => o.as_ref(),
        }
    }

    /// The local file, if this is one.
    pub(crate) fn as_file(&self) -> Option<&File> {
        match self {
            Source::File(f) => Some(f),
            Source::Other(_) => None,
        }
    }
}

impl ReadAt for Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner().read_exact_at(buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        self.inner().size()
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner().write_all_at(data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner().set_len(len)
    }
}
