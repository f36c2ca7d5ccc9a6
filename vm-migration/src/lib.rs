//! The live-migration wire protocol (see `migration-protocol.md`).
//!
//! The protocol types land with the live-migration issue; the crate exists now so the
//! workspace has its final shape and the dependency direction `vm-migration` <- `vmm`
//! is fixed from the start.
#![forbid(unsafe_code)]
