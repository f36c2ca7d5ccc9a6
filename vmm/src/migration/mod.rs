//! Live migration (URLs, transport, the Config payload, sending and receiving).

pub mod config;
mod connections;
mod populate_ahead;
pub mod postcopy;
pub mod receive;
pub mod send;
pub mod transport;
pub mod url;
pub mod watch;

pub use url::MigrationUrl;
