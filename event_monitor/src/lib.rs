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
//!
//! Its own crate (as in Cloud Hypervisor), so that the VMM and the offload daemon can
//! both emit; the names are the typed [`Event`], not strings at each call site. The
//! writer thread runs a hook first, which the VMM uses to install its seccomp filter.

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

/// Every event this VMM emits. The source and name strings are the file's (and Cloud
/// Hypervisor's where it has the event; docs/events.md lists ours beside theirs), and
/// never change: readers match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    VmmStarting,
    VmmShutdown,
    VmBooting,
    VmBooted,
    VmPausing,
    VmPaused,
    VmResuming,
    VmResumed,
    VmSnapshotting,
    VmSnapshotted,
    VmRestoring,
    VmRestored,
    VmShutdown,
    VmDeleted,
    VmRestoreMemoryComplete,
    VmMigrationStarted,
    VmMigrationMemoryIteration,
    VmMigrationPostcopyStarted,
    VmMigrationFinished,
    VmMigrationFailed,
    VmPostcopyMigrationCompleted,
    VmMigrationReceiveStarted,
    VmMigrationReceiveReady,
    VmMigrationReceiveFinished,
    VmMigrationReceiveFailed,
    ApiRequestDropped,
}

impl Event {
    /// Each event, in the order of the table above.
    pub const ALL: [Event; 26] = [
        Event::VmmStarting,
        Event::VmmShutdown,
        Event::VmBooting,
        Event::VmBooted,
        Event::VmPausing,
        Event::VmPaused,
        Event::VmResuming,
        Event::VmResumed,
        Event::VmSnapshotting,
        Event::VmSnapshotted,
        Event::VmRestoring,
        Event::VmRestored,
        Event::VmShutdown,
        Event::VmDeleted,
        Event::VmRestoreMemoryComplete,
        Event::VmMigrationStarted,
        Event::VmMigrationMemoryIteration,
        Event::VmMigrationPostcopyStarted,
        Event::VmMigrationFinished,
        Event::VmMigrationFailed,
        Event::VmPostcopyMigrationCompleted,
        Event::VmMigrationReceiveStarted,
        Event::VmMigrationReceiveReady,
        Event::VmMigrationReceiveFinished,
        Event::VmMigrationReceiveFailed,
        Event::ApiRequestDropped,
    ];

    /// The `source` and `event` strings written for it.
    pub fn strings(self) -> (&'static str, &'static str) {
        match self {
            Event::VmmStarting => ("vmm", "starting"),
            Event::VmmShutdown => ("vmm", "shutdown"),
            Event::VmBooting => ("vm", "booting"),
            Event::VmBooted => ("vm", "booted"),
            Event::VmPausing => ("vm", "pausing"),
            Event::VmPaused => ("vm", "paused"),
            Event::VmResuming => ("vm", "resuming"),
            Event::VmResumed => ("vm", "resumed"),
            Event::VmSnapshotting => ("vm", "snapshotting"),
            Event::VmSnapshotted => ("vm", "snapshotted"),
            Event::VmRestoring => ("vm", "restoring"),
            Event::VmRestored => ("vm", "restored"),
            Event::VmShutdown => ("vm", "shutdown"),
            Event::VmDeleted => ("vm", "deleted"),
            Event::VmRestoreMemoryComplete => ("vm", "restore-memory-complete"),
            Event::VmMigrationStarted => ("vm", "migration-started"),
            Event::VmMigrationMemoryIteration => ("vm", "migration-memory-iteration"),
            Event::VmMigrationPostcopyStarted => ("vm", "migration-postcopy-started"),
            Event::VmMigrationFinished => ("vm", "migration-finished"),
            Event::VmMigrationFailed => ("vm", "migration-failed"),
            Event::VmPostcopyMigrationCompleted => ("vm", "postcopy-migration-completed"),
            Event::VmMigrationReceiveStarted => ("vm", "migration-receive-started"),
            Event::VmMigrationReceiveReady => ("vm", "migration-receive-ready"),
            Event::VmMigrationReceiveFinished => ("vm", "migration-receive-finished"),
            Event::VmMigrationReceiveFailed => ("vm", "migration-receive-failed"),
            Event::ApiRequestDropped => ("api", "request-dropped"),
        }
    }

    /// The component (`vmm`, `vm`, `api`).
    pub fn source(self) -> &'static str {
        self.strings().0
    }

    /// What happened (`booted`).
    pub fn name(self) -> &'static str {
        self.strings().1
    }
}

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Record<'a> {
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
    /// writer thread, which calls `on_start` before anything else.
    pub fn open(path: &Path, on_start: fn()) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file, on_start)
    }

    /// Writes to `file` (an inherited `fd=`), from where its offset is.
    pub fn from_file(file: File, on_start: fn()) -> Result<Self, Error> {
        let (tx, rx) = mpsc::channel::<Message>();
        let writer = thread::Builder::new()
            .name("event-monitor".to_string())
            .spawn(move || {
                on_start();
                write_lines(file, rx)
            })
            .map_err(Error::SpawnWriter)?;
        Ok(Monitor {
            start: Instant::now(),
            lines: Some(tx),
            writer: Some(writer),
        })
    }

    /// Queues one event; see [`event`].
    pub fn emit(&self, event: Event, properties: Option<&BTreeMap<String, String>>) {
        let Some(lines) = &self.lines else { return };
        let line = format_event(self.start.elapsed(), event, properties);
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
    event: Event,
    properties: Option<&BTreeMap<String, String>>,
) -> String {
    let (source, event) = event.strings();
    let event = Record {
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

/// Starts the process-wide monitor writing to `path`. Call it once, early in `main`;
/// the writer thread runs `on_start` first (a seccomp filter, say).
pub fn init(path: &Path, on_start: fn()) -> Result<(), Error> {
    if MONITOR.get().is_some() {
        return Err(Error::AlreadyInitialised);
    }
    install(Monitor::open(path, on_start)?)
}

/// Starts the process-wide monitor writing to an open `file` (`--event-monitor fd=N`).
pub fn init_file(file: File, on_start: fn()) -> Result<(), Error> {
    if MONITOR.get().is_some() {
        return Err(Error::AlreadyInitialised);
    }
    install(Monitor::from_file(file, on_start)?)
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
pub fn event(event: Event, properties: Option<&BTreeMap<String, String>>) {
    if let Some(monitor) = MONITOR.get() {
        monitor.emit(event, properties);
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
        let monitor = Monitor::open(&path, || {}).unwrap();
        monitor.emit(Event::VmBooted, None);
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "0".to_string());
        monitor.emit(Event::VmPaused, Some(&props));
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
            format_event(Duration::new(3, 42), Event::VmBooted, None),
            expected
        );
        let mut props = BTreeMap::new();
        props.insert("id".to_string(), "0".to_string());
        let with = format_event(
            Duration::new(0, 1),
            Event::VmMigrationMemoryIteration,
            Some(&props),
        );
        assert!(
            with.contains("\"properties\": {\n    \"id\": \"0\"\n  }\n}\n\n"),
            "{with}"
        );
    }

    #[test]
    fn open_error_names_the_path() {
        let err = Monitor::open(Path::new("/nonexistent/dir/ev.json"), || {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot open the event monitor file /nonexistent/dir/ev.json"
        );
    }

    #[test]
    fn the_writer_runs_its_start_hook() {
        static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let path = temp_path("hook.json");
        let monitor = Monitor::open(&path, || {
            STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap();
        monitor.flush(Duration::from_secs(10));
        assert!(STARTED.load(std::sync::atomic::Ordering::SeqCst));
    }

    // The only test touching the process-wide monitor (it can be initialised once).
    #[test]
    fn global_init_and_event() {
        event(Event::VmmShutdown, None); // a no-op, must not panic
        let path = temp_path("global.json");
        init(&path, || {}).unwrap();
        assert!(matches!(init(&path, || {}), Err(Error::AlreadyInitialised)));
        event(Event::VmmStarting, None);

        // The writer is asynchronous: wait for the line with a deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("\"event\": \"starting\"") {
                assert!(!text.contains("shutdown"));
                break;
            }
            assert!(Instant::now() < deadline, "event never written: {text:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The strings of every event, written down: the file's contract with its readers
    /// (docs/events.md).
    #[test]
    fn event_strings_are_the_documented_ones() {
        let strings: Vec<(&str, &str)> = Event::ALL.iter().map(|e| e.strings()).collect();
        let expected = [
            ("vmm", "starting"),
            ("vmm", "shutdown"),
            ("vm", "booting"),
            ("vm", "booted"),
            ("vm", "pausing"),
            ("vm", "paused"),
            ("vm", "resuming"),
            ("vm", "resumed"),
            ("vm", "snapshotting"),
            ("vm", "snapshotted"),
            ("vm", "restoring"),
            ("vm", "restored"),
            ("vm", "shutdown"),
            ("vm", "deleted"),
            ("vm", "restore-memory-complete"),
            ("vm", "migration-started"),
            ("vm", "migration-memory-iteration"),
            ("vm", "migration-postcopy-started"),
            ("vm", "migration-finished"),
            ("vm", "migration-failed"),
            ("vm", "postcopy-migration-completed"),
            ("vm", "migration-receive-started"),
            ("vm", "migration-receive-ready"),
            ("vm", "migration-receive-finished"),
            ("vm", "migration-receive-failed"),
            ("api", "request-dropped"),
        ];
        assert_eq!(strings, expected);
        assert_eq!(Event::VmBooted.source(), "vm");
        assert_eq!(Event::ApiRequestDropped.name(), "request-dropped");
    }
}
