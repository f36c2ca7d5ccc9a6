//! VM configuration: serde data (`vm_config`) and the `key=value,...` option parser
//! (`options`) shared by the CLI and ch-remote.

pub mod migration_params;
pub mod options;
pub mod vm_config;

pub use vm_config::*;
