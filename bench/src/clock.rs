//! [`GuestClock`]: the guest's serial output, timestamped from outside the VMM.
//!
//! The VMM is told `--serial file=<fifo>`: a named pipe that a thread here keeps open
//! for reading and writing, so every line is stamped the moment the VMM writes it, not
//! when a poll next looks at a file. This works the same for any VMM: both ours and
//! Cloud Hypervisor open the path with a plain `open(2)` (Cloud Hypervisor truncates,
//! which a pipe ignores), a restored or received VM opens the path stored in its
//! config, and the pipe never holds more than what the thread has not read yet.
//!
//! To tell which VMM printed a line during a migration, the source's pipe is
//! [`GuestClock::retire`]d (renamed away; the source keeps writing into it) before the
//! destination starts, and a new clock takes the path: the destination's lines then go
//! to the new clock only.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use test_infra::{Tick, VmmProcess};

/// Written by [`Drop`] to end the reader; a guest never prints a NUL.
const STOP: &[u8] = b"\0bench-clock-stop\n";

/// One serial line and when it arrived.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

#[derive(Debug)]
pub struct GuestClock {
    path: PathBuf,
    writer: File,
    lines: Arc<Mutex<Vec<Line>>>,
    reader: Option<JoinHandle<io::Result<()>>>,
}

impl GuestClock {
    /// Creates the pipe at `path` (which must not exist) and starts reading it. Every
    /// line is also appended to `<path>.log`, for a look after a failure.
    pub fn new(path: &Path) -> anyhow::Result<GuestClock> {
        test_infra::hostile::mkfifo(path)
            .with_context(|| format!("creating the serial pipe {}", path.display()))?;
        // Read and write: opening does not wait for a writer, and reads never see an
        // end of file when a VMM closes its end (the next VMM opens it again).
        let pipe = File::options()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let writer = pipe.try_clone()?;
        let mut log_path = path.as_os_str().to_owned();
        log_path.push(".log");
        let log = File::create(&log_path)
            .with_context(|| format!("creating {}", PathBuf::from(&log_path).display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&lines);
        let reader = std::thread::Builder::new()
            .name("serial-clock".into())
            .spawn(move || read_lines(pipe, log, &shared))?;
        Ok(GuestClock {
            path: path.to_path_buf(),
            writer,
            lines,
            reader: Some(reader),
        })
    }

    /// Renames the pipe away (to `<path>.<suffix>`), so the next VMM that opens the path
    /// finds a new clock there; whoever has it open keeps writing here.
    pub fn retire(&mut self, suffix: &str) -> anyhow::Result<()> {
        let mut to = self.path.as_os_str().to_owned();
        to.push(format!(".{suffix}"));
        let to = PathBuf::from(to);
        std::fs::rename(&self.path, &to)
            .with_context(|| format!("renaming {}", self.path.display()))?;
        self.path = to;
        Ok(())
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Tick lines so far, with their arrival times.
    pub fn ticks(&self) -> anyhow::Result<Vec<(Instant, Tick)>> {
        ticks(&self.lines())
    }

    /// Waits until `f` accepts the lines so far, failing after `timeout` or as soon as
    /// `vmm` (the VMM that should print) exits.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut vmm: Option<&mut VmmProcess>,
        mut f: impl FnMut(&[Line]) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let found = test_infra::wait::poll_until(Instant::now() + timeout, || {
            if let Some(v) = f(&self.lines())? {
                return Ok(Some(v));
            }
            if let Some(vmm) = vmm.as_deref_mut()
                && let Some(status) = vmm.try_status()?
            {
                if let Some(v) = f(&self.lines())? {
                    return Ok(Some(v));
                }
                bail!(
                    "the VMM exited ({status}) while waiting for {what}\n{}\n--- VMM stderr \
                     tail ---\n{}",
                    self.tail(),
                    tail_of(&vmm.stderr(), 30)
                );
            }
            Ok::<_, anyhow::Error>(None)
        })?;
        match found {
            Some(v) => Ok(v),
            None => {
                let stderr = vmm.map(|v| tail_of(&v.stderr(), 30)).unwrap_or_default();
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n{}\n--- VMM stderr tail \
                     ---\n{stderr}",
                    self.tail()
                )
            }
        }
    }

    /// The first tick that arrived at or after `after`.
    pub fn first_tick_after(
        &self,
        after: Instant,
        timeout: Duration,
        vmm: Option<&mut VmmProcess>,
    ) -> anyhow::Result<(Instant, Tick)> {
        self.wait("a tick line", timeout, vmm, |lines| {
            Ok(ticks(lines)?.into_iter().find(|(at, _)| *at >= after))
        })
    }

    /// Waits for `count` ticks at or after `after`, then checks everything so far is
    /// clean (see [`check_clean`]) with `nonce`. Returns the last of them.
    pub fn clean_ticks_after(
        &self,
        after: Instant,
        count: usize,
        nonce: u64,
        timeout: Duration,
        vmm: Option<&mut VmmProcess>,
    ) -> anyhow::Result<(Instant, Tick)> {
        let what = format!("{count} tick lines");
        let last = self.wait(&what, timeout, vmm, |lines| {
            let t = ticks(lines)?;
            let new: Vec<_> = t.into_iter().filter(|(at, _)| *at >= after).collect();
            Ok((new.len() >= count).then(|| new[count - 1].clone()))
        })?;
        check_clean(&self.lines(), nonce).with_context(|| self.tail())?;
        Ok(last)
    }

    fn tail(&self) -> String {
        let lines = self.lines();
        let from = lines.len().saturating_sub(30);
        let body: Vec<&str> = lines[from..].iter().map(|l| l.text.as_str()).collect();
        format!(
            "--- last serial lines of {} ---\n{}",
            self.path.display(),
            body.join("\n")
        )
    }
}

impl Drop for GuestClock {
    fn drop(&mut self) {
        // The reader stops at the marker; nothing useful to do if it failed earlier.
        let _ = self.writer.write_all(STOP);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn read_lines(mut pipe: File, mut log: File, lines: &Mutex<Vec<Line>>) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = pipe.read(&mut buf)?;
        let at = Instant::now();
        partial.extend_from_slice(&buf[..n]);
        while let Some(nl) = partial.iter().position(|&b| b == b'\n') {
            let rest = partial.split_off(nl + 1);
            let line = std::mem::replace(&mut partial, rest);
            if line.ends_with(STOP) {
                return Ok(());
            }
            log.write_all(&line)?;
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Line { at, text });
        }
    }
}

/// The tick lines among `lines`; a tick line that does not parse is an error.
pub fn ticks(lines: &[Line]) -> anyhow::Result<Vec<(Instant, Tick)>> {
    lines
        .iter()
        .filter(|l| test_infra::lines::is_kind(&l.text, "tick"))
        .map(|l| Ok((l.at, Tick::parse(&l.text)?)))
        .collect()
}

/// No `TG error` line, and every tick has `errors=0` and `nonce` (the guest carried on
/// and did not reboot).
pub fn check_clean(lines: &[Line], nonce: u64) -> anyhow::Result<()> {
    if let Some(bad) = lines
        .iter()
        .find(|l| test_infra::lines::is_kind(&l.text, "error"))
    {
        bail!("the guest verifier found a bad page: {}", bad.text);
    }
    for (_, t) in ticks(lines)? {
        if t.errors != 0 {
            bail!("the guest verifier reports errors: {t:?}");
        }
        if t.nonce != nonce {
            bail!(
                "the guest nonce is {:x}, not {nonce:x} (it rebooted?)",
                t.nonce
            );
        }
    }
    Ok(())
}

fn tail_of(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stamped_and_a_retired_pipe_keeps_its_writer() {
        let dir = test_infra::TempDir::new("bench-clock").unwrap();
        let path = dir.join("serial");
        let mut first = GuestClock::new(&path).unwrap();
        let mut writer = File::options().write(true).open(&path).unwrap();
        let before = Instant::now();
        writer
            .write_all(b"TG tick n=1 nonce=ab gen=1 verified=1 errors=0\npart")
            .unwrap();
        first.retire("src").unwrap();
        let second = GuestClock::new(&path).unwrap();
        writer.write_all(b"ial\n").unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(b"TG tick n=2 nonce=ab gen=2 verified=2 errors=0\n")
            .unwrap();
        let (at, tick) = second
            .first_tick_after(before, Duration::from_secs(5), None)
            .unwrap();
        assert_eq!(tick.n, 2);
        assert!(at >= before);
        let lines = first
            .wait("two lines", Duration::from_secs(5), None, |l| {
                Ok((l.len() == 2).then(|| l.to_vec()))
            })
            .unwrap();
        assert_eq!(lines[1].text, "partial");
        assert_eq!(first.ticks().unwrap().len(), 1);
        check_clean(&lines, 0xab).unwrap();
        assert!(check_clean(&lines, 0xcd).is_err());
        let err = second
            .first_tick_after(Instant::now(), Duration::from_millis(20), None)
            .unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }
}
