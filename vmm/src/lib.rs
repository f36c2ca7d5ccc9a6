//! The VMM library: a KVM virtual machine (x86_64), its devices, the REST API that drives
//! it, and the control loop that owns it.

pub mod api;
pub mod arch;
pub mod config;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod errors;
pub mod events;
pub mod inherited_fd;
pub mod logger;
pub mod memory_manager;
pub mod memsum;
pub mod migration;
pub mod net;
pub mod seccomp;
pub mod snapshot_format;
pub mod snapshot_store;
pub mod sparse;
pub mod state;
pub mod sys;
pub mod thread_priority;
pub mod uffd;
pub mod vm;

pub use crate::config::VmConfig;
pub use crate::control::{VmStartup, Vmm, VmmEvent, VmmExit};
