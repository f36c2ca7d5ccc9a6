//! Routes a VM's state takes out of and into this VMM. Today: the `file://` snapshot
//! store. Live migration (send/receive, transports) lands beside it.

pub mod store;
