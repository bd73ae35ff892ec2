//! libvirt XML: typed reading ([`domain`]), lossless editing ([`tree`], [`edit`]) and our own
//! metadata namespace ([`meta`]).

pub(crate) mod domain;
pub(crate) mod edit;
pub(crate) mod meta;
pub(crate) mod tree;
