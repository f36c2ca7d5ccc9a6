//! Routes a VM's state takes out of and into this VMM: the `file://` snapshot store and
//! live migration (the Config payload, sending and receiving; the sockets are `net`'s).

pub mod config;
mod connections;
mod populate_ahead;
pub mod postcopy;
pub mod receive;
pub mod send;
pub mod store;
pub mod watch;
