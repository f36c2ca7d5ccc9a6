//! Architecture-specific boot and CPU setup (x86_64 only).
pub mod x86_64;
