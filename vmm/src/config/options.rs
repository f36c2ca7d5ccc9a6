//! The `key=value,key=value` option parser shared by the CLI and ch-remote.
