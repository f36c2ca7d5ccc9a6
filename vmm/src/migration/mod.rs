//! Live migration: the Config payload, sending and receiving (the sockets are `net`'s).

pub mod config;
mod connections;
mod populate_ahead;
pub mod postcopy;
pub mod receive;
pub mod send;
pub mod watch;
