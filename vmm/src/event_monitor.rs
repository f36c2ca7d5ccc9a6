//! Lifecycle events as JSON lines (`--event-monitor path=<file>`).
