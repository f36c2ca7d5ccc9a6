//! The chunked snapshot store (docs/offload_daemon.md, "Snapshot store"): guest RAM in
//! fixed-size, content-addressed, compressed and optionally encrypted chunks, behind a
//! [`backend::Backend`] that knows only whole objects by key.

pub mod backend;
pub mod catalog;
pub mod codec;
pub mod file;
pub mod ids;
pub mod lease;
pub mod manifest;
pub mod names;
pub mod reader;
pub mod writer;

/// The largest chunk size a manifest may name.
pub const MAX_CHUNK: u64 = 64 << 20;

#[cfg(test)]
mod tests;
