//! Sockets between VMMs (and a VMM and its offload daemon): `unix:`/`tcp:` URLs, one
//! stream type over both with deadlines and cancel, and listeners. Migration, post-copy
//! fault connections and the daemon all use these; the syscalls they need are `sys`'s.

mod stream;
mod url;

pub use stream::{Cancel, Listener, Stream, is_timeout};
pub use url::{MigrationUrl, UrlError};
