//! Reading the guest's serial output from the file the VMM writes it to
//! (`--serial file=<path>`), incrementally, as complete lines.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::wait::poll_until;

/// How many serial lines a timeout message shows.
pub const TAIL_LINES: usize = 40;

/// `Debug` shows the same text as `Display` (see [`crate::display_chain`]), so a test's
/// `.unwrap()` prints the serial tail readably.
#[derive(thiserror::Error)]
pub enum SerialError {
    #[error("reading serial log {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "timed out waiting for {what} in {path} (from line {from})\n\
         --- last serial lines ---\n{serial_tail}\n--- VMM stderr tail ---\n{stderr_tail}"
    )]
    Timeout {
        what: String,
        path: PathBuf,
        from: usize,
        serial_tail: String,
        stderr_tail: String,
    },
    #[error(
        "{what}\n--- last serial lines ---\n{serial_tail}\n--- VMM stderr tail ---\n{stderr_tail}"
    )]
    Failed {
        what: String,
        serial_tail: String,
        stderr_tail: String,
    },
}

impl std::fmt::Debug for SerialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::display_chain(self, f)
    }
}

/// An append-only serial log read from `path`. Lines are numbered from 0 in the order the
/// guest wrote them; callers keep line numbers as positions ("after the pause").
#[derive(Debug)]
pub struct SerialLog {
    path: PathBuf,
    /// Shown next to the serial tail when a wait fails (the VMM's stderr).
    stderr_path: Option<PathBuf>,
    file: Option<File>,
    partial: Vec<u8>,
    lines: Vec<String>,
}

impl SerialLog {
    /// The file need not exist yet: the VMM creates it after it starts.
    pub fn new(path: impl Into<PathBuf>) -> SerialLog {
        SerialLog {
            path: path.into(),
            stderr_path: None,
            file: None,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Adds the tail of `stderr_path` to every timeout message.
    pub fn with_stderr(mut self, stderr_path: impl Into<PathBuf>) -> SerialLog {
        self.stderr_path = Some(stderr_path.into());
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads whatever the VMM appended since the last call. A trailing partial line is
    /// kept until its newline arrives.
    pub fn refresh(&mut self) -> Result<(), SerialError> {
        let err = |source| SerialError::Read {
            path: self.path.clone(),
            source,
        };
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(err(e)),
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        // The VMM may truncate the file if it opens it with O_TRUNC after we did;
        // read_to_end from our own offset then returns nothing, and we re-sync.
        let pos = file.stream_position().map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len < pos {
            file.seek(SeekFrom::Start(0)).map_err(err)?;
            self.partial.clear();
            self.lines.clear();
        }
        file.read_to_end(&mut buf).map_err(err)?;
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let rest = self.partial.split_off(nl + 1);
            let line = std::mem::replace(&mut self.partial, rest);
            let text = String::from_utf8_lossy(&line);
            self.lines
                .push(text.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(())
    }

    /// All complete lines read so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Number of complete lines read so far: the position "from now on".
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The first line at index >= `from` for which `f` returns `Some`, without waiting.
    pub fn find_map<T>(
        &self,
        from: usize,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Option<(usize, T)> {
        self.lines
            .iter()
            .enumerate()
            .skip(from)
            .find_map(|(i, l)| f(l).map(|v| (i, v)))
    }

    /// Waits until a line at index >= `from` contains `pattern`; returns its index and text.
    pub fn wait_for(
        &mut self,
        pattern: &str,
        from: usize,
        deadline: Instant,
    ) -> Result<(usize, String), SerialError> {
        self.wait_for_map(
            &format!("a line containing {pattern:?}"),
            from,
            deadline,
            |l| l.contains(pattern).then(|| l.to_string()),
        )
    }

    /// Waits until `f` accepts a line at index >= `from` (it returns `Some(value)`), or
    /// fails with the serial tail after `deadline`. `what` names the awaited line in the
    /// error.
    pub fn wait_for_map<T>(
        &mut self,
        what: &str,
        from: usize,
        deadline: Instant,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<(usize, T), SerialError> {
        let found = poll_until(deadline, || {
            self.refresh()?;
            Ok(self.find_map(from, &mut f))
        })?;
        found.ok_or_else(|| self.timeout(what, from))
    }

    /// Builds the timeout error for `what` (also used by callers with their own loops).
    pub fn timeout(&self, what: &str, from: usize) -> SerialError {
        SerialError::Timeout {
            what: what.to_string(),
            path: self.path.clone(),
            from,
            serial_tail: self.tail(TAIL_LINES),
            stderr_tail: self.stderr_tail(),
        }
    }

    /// An error for a failed expectation, with the same context as a timeout.
    pub fn failure(&self, what: impl Into<String>) -> SerialError {
        SerialError::Failed {
            what: what.into(),
            serial_tail: self.tail(TAIL_LINES),
            stderr_tail: self.stderr_tail(),
        }
    }

    /// The last `n` complete lines (and a trailing partial line), numbered.
    pub fn tail(&self, n: usize) -> String {
        let start = self.lines.len().saturating_sub(n);
        let mut out: Vec<String> = self.lines[start..]
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{:5}: {l}", start + i))
            .collect();
        if !self.partial.is_empty() {
            out.push(format!(
                "(partial) {}",
                String::from_utf8_lossy(&self.partial)
            ));
        }
        if out.is_empty() {
            out.push("(no serial output)".to_string());
        }
        out.join("\n")
    }

    fn stderr_tail(&self) -> String {
        match &self.stderr_path {
            Some(p) => file_tail(p, TAIL_LINES),
            None => "(not captured)".to_string(),
        }
    }
}

/// The last `n` lines of a text file, or a note saying why there are none.
pub fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                "(empty)".to_string()
            } else {
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;
    use crate::wait::deadline;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn incremental_lines_and_timeout() {
        let dir = TempDir::new("ti-serial").unwrap();
        let path = dir.join("serial.log");
        let mut log = SerialLog::new(&path);
        log.refresh().unwrap();
        assert!(log.is_empty());
        let mut f = File::create(&path).unwrap();
        f.write_all(b"TG boot nonce=1 cpus=1 mem=1 mode=x\r\nTG ti")
            .unwrap();
        log.refresh().unwrap();
        assert_eq!(log.len(), 1);
        f.write_all(b"ck n=1\nTG tick n=2\n").unwrap();
        let (i, l) = log
            .wait_for("TG tick", 1, deadline(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((i, l.as_str()), (1, "TG tick n=1"));
        let (i, _) = log
            .wait_for("TG tick", 2, deadline(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(i, 2);
        let err = log
            .wait_for("never", 0, deadline(Duration::from_millis(30)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TG tick n=2"), "{err}");
        assert!(err.contains("not captured"), "{err}");
    }
}
