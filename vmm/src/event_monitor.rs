//! Lifecycle events as JSON objects (`--event-monitor path=<file>|fd=<n>`).
//!
//! The file looks byte for byte like Cloud Hypervisor's: each event is a pretty-printed
//! JSON object (two-space indent) followed by an empty line, so a reader that splits on
//! `"\n\n"` (as Cloud Hypervisor's tests do) or streams JSON values works on either VMM:
//!
//! ```text
//! {
//!   "timestamp": {
//!     "secs": 0,
//!     "nanos": 1234
//!   },
//!   "source": "vm",
//!   "event": "booted",
//!   "properties": null
//! }
//!
//! ```
//!
//! The timestamp is monotonic time since the monitor was initialised, which `main` does
//! first thing, so it is effectively time since the VMM process started.
//!
//! Emitting happens on vCPU and control-loop paths, so [`event`] only formats the line and
//! hands it to a writer thread over a channel: it never waits on file I/O.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the event monitor file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the event monitor writer thread")]
    SpawnWriter(#[source] io::Error),
    #[error("the event monitor is already initialised")]
    AlreadyInitialised,
}

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: &'a str,
    event: &'a str,
    properties: Option<&'a BTreeMap<String, String>>,
}

/// An event sink: a channel to a thread that owns the file. Dropping it lets the writer
/// drain what was queued and waits for it.
#[derive(Debug)]
pub struct Monitor {
    start: Instant,
    // Held in an Option so Drop can close the channel before joining the writer.
    lines: Option<Sender<Message>>,
    writer: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Opens (creating, truncating, as Cloud Hypervisor does) `path` and starts the
    /// writer thread.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file)
    }

    /// Writes to `file` (an inherited `fd=`), from where its offset is.
    pub fn from_file(file: File) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel::<Message>();
        let writer = thread::Builder::new()
            .name("event-monitor".to_string())
            .spawn(move || write_lines(file, rx))
            .map_err(Error::SpawnWriter)?;
        Ok(Monitor {
            start: Instant::now(),
            lines: Some(tx),
            writer: Some(writer),
        })
    }

    /// Queues one event; see [`event`].
    pub fn emit(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        let Some(lines) = &self.lines else { return };
        let line = format_event(self.start.elapsed(), source, event, properties);
        // The writer only goes away if it failed; it already logged why.
        let _ = lines.send(Message::Event(line));
    }

    /// Waits up to `timeout` until every event queued so far is written.
    pub fn flush(&self, timeout: Duration) {
        let Some(lines) = &self.lines else { return };
        let (ack, done) = mpsc::channel();
        if lines.send(Message::Flush(ack)).is_ok() && done.recv_timeout(timeout).is_err() {
            log::warn!("event monitor: events not written within {timeout:?}");
        }
    }
}

/// What the writer thread gets: an event to write, or a request to say when all before
/// it are written.
#[derive(Debug)]
enum Message {
    Event(String),
    Flush(Sender<()>),
}

impl Drop for Monitor {
    fn drop(&mut self) {
        drop(self.lines.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            log::warn!("event monitor writer thread panicked");
        }
    }
}

fn format_event(
    elapsed: Duration,
    source: &str,
    event: &str,
    properties: Option<&BTreeMap<String, String>>,
) -> String {
    let event = Event {
        timestamp: Timestamp {
            secs: elapsed.as_secs(),
            nanos: elapsed.subsec_nanos(),
        },
        source,
        event,
        properties,
    };
    // Serializing strings and a string map cannot fail; fall back to a marker rather
    // than panic on a hot path should that ever change.
    let mut text =
        serde_json::to_string_pretty(&event).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push_str("\n\n");
    text
}

fn write_lines(mut file: File, lines: mpsc::Receiver<Message>) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::EventMonitor);
    for message in lines {
        let line = match message {
            Message::Event(line) => line,
            Message::Flush(ack) => {
                let _ = ack.send(());
                continue;
            }
        };
        // One write per event, flushed, so a reader (a test, an orchestrator) sees each
        // event at once and whole.
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
            log::error!("event monitor: cannot write event, stopping: {e}");
            return;
        }
    }
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Starts the process-wide monitor writing to `path`. Call it once, early in `main`.
pub fn init(path: &Path) -> Result<(), Error> {
    if MONITOR.get().is_some() {
        return Err(Error::AlreadyInitialised);
    }
    install(Monitor::open(path)?)
}

/// Starts the process-wide monitor writing to an open `file` (`--event-monitor fd=N`).
pub fn init_file(file: File) -> Result<(), Error> {
    if MONITOR.get().is_some() {
        return Err(Error::AlreadyInitialised);
    }
    install(Monitor::from_file(file)?)
}

fn install(monitor: Monitor) -> Result<(), Error> {
    // A concurrent init that won the race keeps its monitor; ours is dropped and closed.
    MONITOR.set(monitor).map_err(|_| Error::AlreadyInitialised)
}

/// Waits (up to `timeout`) until the process-wide monitor has written every event so far:
/// `main` calls it before exiting, so the last events (`vmm shutdown`) are in the file.
pub fn flush(timeout: Duration) {
    if let Some(monitor) = MONITOR.get() {
        monitor.flush(timeout);
    }
}

/// Emits one event to the process-wide monitor, or does nothing if none was initialised.
/// `source` is the component (`vmm`, `vm`, `cpu`...), `event` what happened (`booted`).
pub fn event(source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
    if let Some(monitor) = MONITOR.get() {
        monitor.emit(source, event, properties);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file path in a fresh directory that is removed on drop.
    struct TempFile(PathBuf);

    impl std::ops::Deref for TempFile {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempFile {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn temp_path(name: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("event_monitor_{}_{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempFile(dir.join(name))
    }

    #[test]
    fn writes_one_json_object_per_line() {
        let path = temp_path("lines.json");
        std::fs::write(&path, "previous\n").unwrap();
        let monitor = Monitor::open(&path).unwrap();
        monitor.emit("vm", "booted", None);
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "0".to_string());
        monitor.emit("cpu", "paused", Some(&props));
        drop(monitor); // drains and joins the writer

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("previous"), "the file is truncated");
        // Cloud Hypervisor's readers split on empty lines.
        let events: Vec<serde_json::Value> = text
            .trim()
            .split("\n\n")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 2);
        let first = &events[0];
        assert_eq!(first["source"], "vm");
        assert_eq!(first["event"], "booted");
        assert!(first["properties"].is_null());
        assert!(first["timestamp"]["secs"].is_u64());
        assert!(first["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["properties"]["id"], "0");
        assert!(text.ends_with("}\n\n"));
    }

    #[test]
    fn format_matches_cloud_hypervisor() {
        // The bytes Cloud Hypervisor v54 writes for the same event.
        let expected = "{\n  \"timestamp\": {\n    \"secs\": 3,\n    \"nanos\": 42\n  },\n  \
                        \"source\": \"vm\",\n  \"event\": \"booted\",\n  \"properties\": null\n}\n\n";
        assert_eq!(
            format_event(Duration::new(3, 42), "vm", "booted", None),
            expected
        );
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "0".to_string());
        let with = format_event(
            Duration::new(0, 1),
            "vm",
            "migration-memory-iteration",
            Some(&props),
        );
        assert!(
            with.contains("\"properties\": {\n    \"id\": \"0\"\n  }\n}\n\n"),
            "{with}"
        );
    }

    #[test]
    fn open_error_names_the_path() {
        let err = Monitor::open(Path::new("/nonexistent/dir/ev.json")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot open the event monitor file /nonexistent/dir/ev.json"
        );
    }

    // The only test touching the process-wide monitor (it can be initialised once).
    #[test]
    fn global_init_and_event() {
        event("vmm", "before-init", None); // a no-op, must not panic
        let path = temp_path("global.json");
        init(&path).unwrap();
        assert!(matches!(init(&path), Err(Error::AlreadyInitialised)));
        event("vmm", "starting", None);

        // The writer is asynchronous: wait for the line with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"event\": \"starting\"") {
                assert!(!text.contains("before-init"));
                break;
            }
            assert!(Instant::now() < deadline, "event never written: {text:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }
}
