//! In-process work on qcow2 disk layers, shared by the QEMU and libvirt backends of stagecore.
//!
//! # The layer model
//!
//! A disk is a *chain* of image files. Reads go to the top file; a cluster the top does not
//! allocate is read from its backing file, and so on down to the base:
//!
//! ```text
//!   base (production's disk, read-only)  ←  baseline layer  ←  top overlay (written by the guest)
//! ```
//!
//! * Taking a **baseline** of a running disk puts a new empty overlay on top of it; the file
//!   below becomes the read-only baseline layer, frozen at that instant.
//! * A **linked clone** is one more empty overlay on a frozen layer: [`create_overlay`] writes its
//!   header in-process (no `qemu-img` spawn), durably and atomically.
//! * **Disk drift** is the allocation of the layers above the baseline: [`changed_since`] reads
//!   the L1 table and only the allocated L2 tables of each such layer, so it costs O(changed),
//!   not O(disk size). [`allocated_extents`] gives one layer's own allocation.
//! * A **full clone** flattens what a chain allocates into one new independent file:
//!   [`copy_allocated`].
//! * [`read_at`], [`write_at`] and [`digest`] work on guest-visible content through the chain.
//!
//! No QEMU process is involved. All functions are blocking file I/O; [`create_overlay`],
//! [`info`], [`chain`], [`allocated_extents`] and [`changed_since`] finish in well under a
//! millisecond on metadata in the page cache, while [`copy_allocated`] and [`digest`] move data
//! and belong in `tokio::task::spawn_blocking` when called from async code.
//!
//! * [`seal`] records a read-only layer's metadata (header, L1, L2 and refcount tables, size,
//!   mtime) in a [`LayerSeal`]; [`verify`] proves it unchanged or names what changed.
//!   Over a [`Resolver`] (a remote host's volumes), [`seal_in`] and [`verify_in`] compute the same
//!   hashes without a modification time (metadata-only seals).
//!   [`Seals`] keeps the seals of an environment's baseline layers (one per file): backends
//!   [`Seals::seal_chains`] when a baseline freezes layers and [`Seals::verify_chains`] before
//!   drift, staging and promotion trust them again (`*_in` methods: over a [`Resolver`]).
//!
//! # What is read
//!
//! qcow2 v2 and v3, any cluster size, deflate- and zstd-compressed clusters, zero clusters,
//! extended L2 entries (subclusters: allocation maps and reads at 1/32-cluster granularity),
//! internal snapshots (the active L1 only), raw backing files. Not read: encryption, external
//! data files ([`Error::UnsupportedFeature`]). [`write_at`] additionally refuses extended L2,
//! internal snapshots and refcount widths other than 16 bits.
//!
//! # Errors
//!
//! The crate's own [`Error`] has variants that name the file (`NotFound`, `AlreadyExists`,
//! `NotQcow2`, `Corrupt`, `UnsupportedFeature`, `BaseNotInChain`, `InvalidArgument`,
//! `LayerChanged`, `Io`); [`Error::is_not_checked`] tells a drift engine which of them mean
//! "cannot see: NOT_CHECKED". Every function returns it; a backend maps it into
//! [`stagecore::Error`] once, with its own name, through [`Error::into_core`] (table in the
//! `error` module docs): `NotFound`, `AlreadyExists`, `InvalidSpec { path: <file> }` for
//! `NotQcow2`/`Corrupt`, `NotSupported` for `UnsupportedFeature`, `InvalidSpec { path: "base" }`
//! for `BaseNotInChain`, `InvalidSpec { path: <argument> }`, `Precondition` for `LayerChanged`,
//! `Backend { backend: <the caller's> }` for `Io`.

mod alloc;
mod chain;
mod copy;
mod create;
mod error;
mod header;
mod layer;
mod publish;
mod read;
mod seal;
mod seals;
mod source;
mod types;
mod write;

mod ops;

pub use alloc::CacheStats;
pub use copy::CopyJob;
pub use error::{Error, Feature, Result};
pub use ops::*;
pub use seal::LayerSeal;
pub use seals::Seals;
pub use source::{ReadAt, Resolver};
pub use types::{CopyStats, Extent, ImageFormat, ImageInfo};
