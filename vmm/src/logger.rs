//! A minimal logger for the project's binaries, so they need no logging crate beyond
//! `log`: `<program>: <secs>.<micros>s: <LEVEL>:<target> -- <message>`, to stderr or to
//! the file of `--log-file`.

use std::fs::File;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    program: &'static str,
    start: Instant,
    level: LevelFilter,
    /// `--log-file`; stderr without it.
    file: Option<File>,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        // One write per line so lines from different threads don't interleave.
        let line = format!(
            "{}: {}.{:06}s: {}:{} -- {}\n",
            self.program,
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            record.target(),
            record.args()
        );
        // Nowhere to report a failing log. `&File` is `Write`: one write(2) per line,
        // appended at the file's offset (O_APPEND is not needed for a single writer fd).
        let _ = match &self.file {
            Some(file) => {
                let mut f = file;
                f.write_all(line.as_bytes())
            }
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger at `level`, timing lines from `start`. A second call keeps the
/// first logger.
pub fn init(program: &'static str, level: LevelFilter, start: Instant) {
    init_to(program, level, start, None);
}

/// Like [`init`], writing to `file` (`--log-file`, created or truncated by the caller as
/// Cloud Hypervisor does) instead of stderr when given.
pub fn init_to(program: &'static str, level: LevelFilter, start: Instant, file: Option<File>) {
    let logger = LOGGER.get_or_init(|| StderrLogger {
        program,
        start,
        level,
        file,
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
