//! Spawning the VMM as a child process and driving it through its serial log, its REST
//! socket and `ch-remote`. Nothing here calls the vmm crate: tests see the VMM exactly as
//! a user does.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::lines::{self, Boot, GuestError, Ready, Tick};
use crate::serial::{SerialError, SerialLog, TAIL_LINES, file_tail};
use crate::tempdir::TempDir;
use crate::wait::{deadline, poll_until};

/// Per-request socket timeout: an API call that takes longer means a wedged VMM, and a
/// test should fail rather than hang.
pub const API_TIMEOUT: Duration = Duration::from_secs(20);

/// `Debug` shows the same text as `Display` plus the source chain (see
/// [`crate::display_chain`]), so a test's `.unwrap()` prints the tails readably.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("cannot find the {name} binary: {reason}")]
    LocateBinary { name: &'static str, reason: String },
    #[error("cannot create a temporary directory")]
    TempDir(#[source] io::Error),
    #[error("cannot create {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the VMM (pid {pid})")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(
        "the VMM exited ({status}) while waiting for {what}\n\
         --- last serial lines ---\n{serial_tail}\n--- VMM stderr tail ---\n{stderr_tail}"
    )]
    VmmExited {
        status: ExitStatus,
        what: String,
        serial_tail: String,
        stderr_tail: String,
    },
    #[error("the VMM has no API socket (spawned without one)")]
    NoApiSocket,
    #[error("API request {method} {path} failed")]
    Api {
        method: String,
        path: String,
        #[source]
        source: api_client::Error,
    },
    #[error("API request {method} {path} answered {status}: {body}")]
    ApiStatus {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("API response to {path} is not the expected JSON: {reason}")]
    ApiJson { path: String, reason: String },
    #[error("no {name:?} event within {timeout:?}; events so far: {seen:?}")]
    NoEvent {
        name: String,
        timeout: Duration,
        seen: Vec<String>,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::display_chain(self, f)
    }
}

/// Where the `cloud-hypervisor` and `ch-remote` executables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub cloud_hypervisor: PathBuf,
    pub ch_remote: PathBuf,
}

impl Binaries {
    /// Explicit paths, e.g. `env!("CARGO_BIN_EXE_cloud-hypervisor")` inside the
    /// cloud-hypervisor crate's integration tests.
    pub fn new(cloud_hypervisor: impl Into<PathBuf>, ch_remote: impl Into<PathBuf>) -> Self {
        Binaries {
            cloud_hypervisor: cloud_hypervisor.into(),
            ch_remote: ch_remote.into(),
        }
    }

    /// Both binaries in `dir` (e.g. `target/release`).
    pub fn in_dir(dir: &Path) -> Self {
        Self::new(dir.join("cloud-hypervisor"), dir.join("ch-remote"))
    }

    /// `$CLOUD_HYPERVISOR_BIN` / `$CH_REMOTE_BIN` if set; otherwise the nearest ancestor
    /// directory of the running executable that holds both binaries. That finds
    /// `target/<profile>/` from `target/<profile>/deps/<test>-<hash>` and from
    /// `target/<profile>/bench` alike, so the binaries match the caller's profile.
    pub fn locate() -> Result<Self, Error> {
        if let (Some(ch), Some(remote)) = (
            std::env::var_os("CLOUD_HYPERVISOR_BIN"),
            std::env::var_os("CH_REMOTE_BIN"),
        ) {
            return Ok(Self::new(ch, remote));
        }
        let exe = std::env::current_exe().map_err(|e| Error::LocateBinary {
            name: "cloud-hypervisor",
            reason: format!("current_exe: {e}"),
        })?;
        exe.ancestors()
            .skip(1)
            .map(Self::in_dir)
            .find(|b| b.cloud_hypervisor.is_file() && b.ch_remote.is_file())
            .ok_or_else(|| Error::LocateBinary {
                name: "cloud-hypervisor",
                reason: format!(
                    "no ancestor directory of {} holds cloud-hypervisor and ch-remote \
                     (build them with `cargo build -p cloud-hypervisor`, or set \
                     CLOUD_HYPERVISOR_BIN and CH_REMOTE_BIN)",
                    exe.display()
                ),
            })
    }
}

/// How to start a VMM. By default: 1 vCPU, 256 MiB, serial to a file, an API socket and
/// an event monitor file, all in a fresh temp dir.
#[derive(Debug, Clone)]
pub struct VmmBuilder {
    bins: Binaries,
    kernel: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: u8,
    memory: String,
    serial: bool,
    /// Serial output to this file instead of `serial.log` in the temp dir.
    serial_file: Option<PathBuf>,
    api_socket: bool,
    /// Appended to `--api-socket path=<socket>`, e.g. `max_connections=4`.
    api_socket_options: Option<String>,
    event_monitor: bool,
    extra_args: Vec<OsString>,
    raw_args: Option<Vec<OsString>>,
    wrapper: Vec<OsString>,
    world_writable_dir: bool,
    tmp_prefix: String,
    /// `--cpus`, `--memory`, `--serial` and `--console` (see `without_vm_options`).
    vm_options: bool,
}

impl VmmBuilder {
    pub fn new(bins: Binaries) -> Self {
        VmmBuilder {
            bins,
            kernel: None,
            cmdline: None,
            cpus: 1,
            memory: "size=256M".to_string(),
            serial: true,
            serial_file: None,
            api_socket: true,
            api_socket_options: None,
            event_monitor: true,
            extra_args: Vec::new(),
            raw_args: None,
            wrapper: Vec::new(),
            world_writable_dir: false,
            tmp_prefix: "vmm".to_string(),
            vm_options: true,
        }
    }

    /// `--kernel <path>`.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// `--kernel <test guest ELF>`.
    pub fn test_guest(self) -> Self {
        self.kernel(crate::guest::elf_path())
    }

    /// `--cmdline <cmdline>`.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// `--cpus boot=<n>`.
    pub fn cpus(mut self, n: u8) -> Self {
        self.cpus = n;
        self
    }

    /// `--memory <spec>`, e.g. `size=512M,shared=on`.
    pub fn memory(mut self, spec: impl Into<String>) -> Self {
        self.memory = spec.into();
        self
    }

    /// `--serial off` instead of a file (then no serial waits are possible).
    pub fn no_serial(mut self) -> Self {
        self.serial = false;
        self
    }

    /// Serial output to `path`, which outlives the VMM's temp dir (a restored or
    /// migrated VM writes to its own VMM's `--serial`, never to the path its snapshot
    /// or sender names).
    pub fn serial_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.serial_file = Some(path.into());
        self
    }

    fn serial_path(&self, dir: &Path) -> PathBuf {
        self.serial_file
            .clone()
            .unwrap_or_else(|| dir.join("serial.log"))
    }

    /// No `--api-socket`.
    pub fn no_api_socket(mut self) -> Self {
        self.api_socket = false;
        self
    }

    /// `--api-socket path=<socket>,<options>` (e.g. `max_connections=4`).
    pub fn api_socket_options(mut self, options: impl Into<String>) -> Self {
        self.api_socket_options = Some(options.into());
        self
    }

    /// No `--event-monitor`.
    pub fn no_event_monitor(mut self) -> Self {
        self.event_monitor = false;
        self
    }

    /// Appended after the generated arguments.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Replaces every generated argument: the VMM gets exactly `args` (for tests of
    /// the command line parser itself).
    pub fn raw_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.raw_args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Runs the VMM through `wrapper` (e.g. `setpriv --reuid=65534 ...`); the wrapper
    /// must exec the VMM so that the child pid stays the VMM's.
    pub fn wrapper<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// Makes the temp dir world-writable, for a VMM that runs as another user.
    pub fn world_writable_dir(mut self) -> Self {
        self.world_writable_dir = true;
        self
    }

    /// No `--cpus`, `--memory`, `--serial` or `--console`: a VMM that only waits for a
    /// restore or an incoming migration, started as Cloud Hypervisor requires (it refuses
    /// VM options without a kernel). Add `--serial` with `arg` if wanted.
    pub fn without_vm_options(mut self) -> Self {
        self.vm_options = false;
        self
    }

    /// Names the temp dir after the test, which helps when one is kept for debugging.
    pub fn tmp_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.tmp_prefix = prefix.into();
        self
    }

    /// The VMM arguments this builder produces for a run in `dir`.
    fn args(&self, dir: &Path) -> Vec<OsString> {
        if let Some(raw) = &self.raw_args {
            return raw.clone();
        }
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: &OsStr| {
            args.push(k.into());
            args.push(v.to_owned());
        };
        if let Some(kernel) = &self.kernel {
            push("--kernel", kernel.as_os_str());
        }
        if let Some(cmdline) = &self.cmdline {
            push("--cmdline", OsStr::new(cmdline));
        }
        if self.vm_options {
            push("--cpus", OsStr::new(&format!("boot={}", self.cpus)));
            push("--memory", OsStr::new(&self.memory));
            if self.serial {
                let mut v = OsString::from("file=");
                v.push(self.serial_path(dir));
                push("--serial", &v);
            } else {
                push("--serial", OsStr::new("off"));
            }
            push("--console", OsStr::new("off"));
        }
        if self.api_socket {
            let socket = dir.join("api.sock");
            match &self.api_socket_options {
                Some(options) => {
                    let mut v = OsString::from("path=");
                    v.push(&socket);
                    v.push(format!(",{options}"));
                    push("--api-socket", &v);
                }
                None => push("--api-socket", socket.as_os_str()),
            }
        }
        if self.event_monitor {
            let mut v = OsString::from("path=");
            v.push(dir.join("events.json"));
            push("--event-monitor", &v);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts the VMM in its own process group, stdout/stderr to files in the temp dir.
    pub fn spawn(self) -> Result<VmmProcess, Error> {
        let tmp = TempDir::new(&self.tmp_prefix).map_err(Error::TempDir)?;
        if self.world_writable_dir {
            tmp.make_world_writable().map_err(Error::TempDir)?;
        }
        let stdout_path = tmp.join("stdout.log");
        let stderr_path = tmp.join("stderr.log");
        let create = |path: &Path| {
            File::create(path).map_err(|source| Error::CreateFile {
                path: path.to_path_buf(),
                source,
            })
        };
        let stdout = create(&stdout_path)?;
        let stderr = create(&stderr_path)?;
        let args = self.args(tmp.path());
        let (program, pre_args): (&OsStr, &[OsString]) = match self.wrapper.split_first() {
            Some((w, rest)) => (w.as_os_str(), rest),
            None => (self.bins.cloud_hypervisor.as_os_str(), &[]),
        };
        let mut cmd = Command::new(program);
        cmd.args(pre_args);
        if !self.wrapper.is_empty() {
            cmd.arg(&self.bins.cloud_hypervisor);
        }
        // The temp dir as working directory: anything the VMM writes to a relative path
        // (a core dump, say) stays with the test's other files.
        cmd.args(&args)
            .current_dir(tmp.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // Its own process group, so Drop can kill the VMM and anything it started with
        // one signal, and a Ctrl-C on the test runner does not race our cleanup.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            program: PathBuf::from(program),
            source,
        })?;
        let serial_path = self.serial_path(tmp.path());
        Ok(VmmProcess {
            child,
            status: None,
            serial: SerialLog::new(serial_path).with_stderr(&stderr_path),
            api_socket: self.api_socket.then(|| tmp.join("api.sock")),
            event_monitor: self.event_monitor.then(|| tmp.join("events.json")),
            stderr_path,
            stdout_path,
            bins: self.bins,
            args,
            started: Instant::now(),
            tmp,
        })
    }
}

/// The events in an event monitor file: a stream of JSON values, whatever the layout.
pub fn parse_events(text: &str) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    while let Some(next) = stream.next() {
        match next {
            Ok(event) => events.push(event),
            Err(_) => {
                // An event may be half written; what follows the last whole one is shown.
                let rest = text[stream.byte_offset()..].trim();
                if !rest.is_empty() {
                    events.push(serde_json::Value::String(rest.to_string()));
                }
                break;
            }
        }
    }
    events
}

/// A running (or exited) VMM. Dropping it SIGKILLs its process group and reaps it, then
/// removes its temp dir.
#[derive(Debug)]
pub struct VmmProcess {
    child: Child,
    status: Option<ExitStatus>,
    serial: SerialLog,
    api_socket: Option<PathBuf>,
    event_monitor: Option<PathBuf>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    bins: Binaries,
    args: Vec<OsString>,
    started: Instant,
    // Declared last: dropped after Drop::drop has killed the VMM that writes into it.
    tmp: TempDir,
}

impl VmmProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When `spawn` returned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The arguments the VMM was given (after any wrapper).
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    pub fn tmp_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Keep the temp dir (serial log, stderr, events) after drop, for debugging.
    pub fn keep_tmp_dir(&mut self) {
        self.tmp.keep();
    }

    /// Follows the guest's serial output in `path` from now on (where another process
    /// was told to write it).
    pub fn follow_serial(&mut self, path: impl Into<PathBuf>) {
        self.serial = SerialLog::new(path.into()).with_stderr(&self.stderr_path);
    }

    pub fn serial(&mut self) -> &mut SerialLog {
        &mut self.serial
    }

    pub fn api_socket(&self) -> Option<&Path> {
        self.api_socket.as_deref()
    }

    pub fn event_monitor_path(&self) -> Option<&Path> {
        self.event_monitor.as_deref()
    }

    /// Everything the VMM wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything the VMM wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read(&self.stdout_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The event monitor's JSON objects so far (pretty-printed objects separated by an
    /// empty line, as Cloud Hypervisor writes them). Text that does not parse ends the
    /// list as one JSON string, so a test can show it.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let Some(path) = &self.event_monitor else {
            return Vec::new();
        };
        parse_events(&std::fs::read_to_string(path).unwrap_or_default())
    }

    /// Waits until the event monitor has written an event called `name` and returns it.
    /// The VMM writes events from a thread of their own, so one may land in the file a
    /// moment after the state it reports shows in vm.info.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Result<serde_json::Value, Error> {
        let found = poll_until(deadline(timeout), || {
            Ok::<_, Error>(self.events().into_iter().find(|e| e["event"] == name))
        })?;
        found.ok_or_else(|| Error::NoEvent {
            name: name.to_string(),
            timeout,
            seen: self
                .events()
                .iter()
                .map(|e| e["event"].as_str().unwrap_or("?").to_string())
                .collect(),
        })
    }

    /// The exit status if the VMM has exited (reaps it), without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, Error> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| Error::Wait {
                pid: self.child.id(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the VMM to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, Error> {
        poll_until(deadline(timeout), || self.try_status())
    }

    /// Like `wait_exit`, but a VMM still running after `timeout` is an error that shows
    /// its serial and stderr tails.
    pub fn expect_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        match self.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => Err(self
                .serial
                .timeout(&format!("the VMM to exit within {timeout:?}"), 0)
                .into()),
        }
    }

    /// SIGKILLs the process group and reaps the VMM. Idempotent.
    pub fn kill(&mut self) -> Result<ExitStatus, Error> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        self.kill_group();
        let status = self.child.wait().map_err(|source| Error::Wait {
            pid: self.child.id(),
            source,
        })?;
        self.status = Some(status);
        Ok(status)
    }

    fn kill_group(&self) {
        // Only while the child is unreaped: until then its pid, and so the group id,
        // cannot have been reused by an unrelated process.
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory effects; the group is the VMM's own.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }

    // ---- serial -------------------------------------------------------------------

    /// Waits until `f` accepts a serial line at index >= `from`. Fails at once, with the
    /// exit status, if the VMM exits first (after one last look at the log, so a line
    /// printed just before a clean exit is still found).
    pub fn wait_for_map<T>(
        &mut self,
        what: &str,
        from: usize,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<(usize, T), Error> {
        let found = poll_until(deadline(timeout), || {
            self.serial.refresh()?;
            if let Some(hit) = self.serial.find_map(from, &mut f) {
                return Ok(Some(hit));
            }
            if let Some(status) = self.try_status()? {
                self.serial.refresh()?;
                if let Some(hit) = self.serial.find_map(from, &mut f) {
                    return Ok(Some(hit));
                }
                return Err(self.exited_error(status, what));
            }
            Ok(None)
        })?;
        found.ok_or_else(|| self.serial.timeout(what, from).into())
    }

    fn exited_error(&self, status: ExitStatus, what: &str) -> Error {
        Error::VmmExited {
            status,
            what: what.to_string(),
            serial_tail: self.serial.tail(TAIL_LINES),
            stderr_tail: file_tail(&self.stderr_path, TAIL_LINES),
        }
    }

    /// Waits for a serial line at index >= `from` containing `pattern`.
    pub fn wait_for_line(
        &mut self,
        pattern: &str,
        from: usize,
        timeout: Duration,
    ) -> Result<(usize, String), Error> {
        let what = format!("a line containing {pattern:?}");
        self.wait_for_map(&what, from, timeout, |l| {
            l.contains(pattern).then(|| l.to_string())
        })
    }

    /// Waits for a `TG <kind>` line at index >= `from` and decodes it with `parse`. A
    /// line of that kind that does not decode is an error, not something to skip.
    fn wait_for_kind<T>(
        &mut self,
        kind: &'static str,
        from: usize,
        timeout: Duration,
        parse: fn(&str) -> Result<T, lines::ParseError>,
    ) -> Result<(usize, T), Error> {
        let (idx, parsed) =
            self.wait_for_map(&format!("a `TG {kind}` line"), from, timeout, |l| {
                lines::is_kind(l, kind).then(|| parse(l))
            })?;
        match parsed {
            Ok(v) => Ok((idx, v)),
            Err(e) => Err(self.serial.failure(e.to_string()).into()),
        }
    }

    /// The `TG boot` line.
    pub fn wait_boot(&mut self, timeout: Duration) -> Result<(usize, Boot), Error> {
        self.wait_for_kind("boot", 0, timeout, Boot::parse)
    }

    /// The first `TG ready` line at index >= `from`.
    pub fn wait_ready(&mut self, from: usize, timeout: Duration) -> Result<(usize, Ready), Error> {
        self.wait_for_kind("ready", from, timeout, Ready::parse)
    }

    /// The first `TG tick` line at index >= `from`.
    pub fn wait_tick(&mut self, from: usize, timeout: Duration) -> Result<(usize, Tick), Error> {
        self.wait_for_kind("tick", from, timeout, Tick::parse)
    }

    /// Waits for `count` consecutive tick lines from `from` on, each within `per_tick`,
    /// and checks the guest's verifier: every tick has errors=0, no `TG error` line
    /// appears, and all ticks carry the same nonce. Returns the ticks and the index of
    /// the line after the last one.
    pub fn wait_ticks(
        &mut self,
        count: usize,
        from: usize,
        per_tick: Duration,
    ) -> Result<(usize, Vec<Tick>), Error> {
        let mut ticks: Vec<Tick> = Vec::with_capacity(count);
        let mut pos = from;
        while ticks.len() < count {
            let (idx, tick) = self.wait_tick(pos, per_tick)?;
            self.check_no_guest_errors(pos, idx + 1)?;
            if tick.errors != 0 {
                return Err(self
                    .serial
                    .failure(format!(
                        "the guest verifier reports errors: line {idx}: {tick:?}"
                    ))
                    .into());
            }
            if let Some(first) = ticks.first()
                && first.nonce != tick.nonce
            {
                return Err(self
                    .serial
                    .failure(format!(
                        "the guest nonce changed from {:x} to {:x} at line {idx} (the guest \
                         rebooted?)",
                        first.nonce, tick.nonce
                    ))
                    .into());
            }
            ticks.push(tick);
            pos = idx + 1;
        }
        Ok((pos, ticks))
    }

    /// Fails if a `TG error` line is among serial lines `[from, to)`.
    pub fn check_no_guest_errors(&mut self, from: usize, to: usize) -> Result<(), Error> {
        let lines = self.serial.lines();
        let to = to.min(lines.len());
        let bad = lines
            .get(from..to)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .find(|(_, l)| lines::is_kind(l, "error"));
        if let Some((i, line)) = bad {
            let detail = match GuestError::parse(line) {
                Ok(e) => format!("{e:?}"),
                Err(e) => e.to_string(),
            };
            return Err(self
                .serial
                .failure(format!(
                    "guest verifier error at line {}: {detail}",
                    from + i
                ))
                .into());
        }
        Ok(())
    }

    /// Asserts that no line containing `pattern` appears at index >= `from` for the
    /// whole of `quiet` (e.g. no tick while paused). This wait is meant to time out.
    pub fn expect_no_line(
        &mut self,
        pattern: &str,
        from: usize,
        quiet: Duration,
    ) -> Result<(), Error> {
        let what = format!("silence (no line containing {pattern:?} for {quiet:?})");
        let seen: Option<()> = poll_until(deadline(quiet), || {
            self.serial.refresh()?;
            if let Some((idx, line)) = self
                .serial
                .find_map(from, |l| l.contains(pattern).then(|| l.to_string()))
            {
                return Err(Error::from(
                    self.serial
                        .failure(format!("expected {what}, but line {idx} is {line:?}")),
                ));
            }
            if let Some(status) = self.try_status()? {
                return Err(self.exited_error(status, &what));
            }
            Ok(None)
        })?;
        debug_assert!(seen.is_none());
        Ok(())
    }

    // ---- REST and ch-remote --------------------------------------------------------

    fn socket(&self) -> Result<&Path, Error> {
        self.api_socket.as_deref().ok_or(Error::NoApiSocket)
    }

    /// One API request; `path` is `vm.info` or a full `/api/v1/...` path. Any HTTP
    /// status is returned as is.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<api_client::Response, Error> {
        self.api_with_timeout(method, path, body, API_TIMEOUT)
    }

    /// Like `api`, for calls that take as long as their data (large snapshots and
    /// restores).
    pub fn api_with_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<api_client::Response, Error> {
        api_client::api_command(self.socket()?, method, path, body, Some(timeout)).map_err(
            |source| Error::Api {
                method: method.to_string(),
                path: path.to_string(),
                source,
            },
        )
    }

    /// Like `api`, but a non-2xx status is an error.
    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<api_client::Response, Error> {
        let resp = self.api(method, path, body)?;
        if resp.is_success() {
            Ok(resp)
        } else {
            Err(Error::ApiStatus {
                method: method.to_string(),
                path: path.to_string(),
                status: resp.status,
                body: resp.body,
            })
        }
    }

    /// Waits until the API socket answers `vmm.ping` (the VMM creates it after start).
    pub fn wait_api_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let socket = self.socket()?.to_path_buf();
        let what = format!("the API socket {} to answer vmm.ping", socket.display());
        let ready = poll_until(deadline(timeout), || {
            if socket.exists()
                && let Ok(resp) = self.api("GET", "vmm.ping", None)
                && resp.is_success()
            {
                return Ok(Some(()));
            }
            if let Some(status) = self.try_status()? {
                return Err(self.exited_error(status, &what));
            }
            Ok(None)
        })?;
        ready.ok_or_else(|| self.serial.timeout(&what, 0).into())
    }

    /// `vm.info` as JSON.
    pub fn vm_info(&self) -> Result<serde_json::Value, Error> {
        let resp = self.api_ok("GET", "vm.info", None)?;
        serde_json::from_str(&resp.body).map_err(|e| Error::ApiJson {
            path: "vm.info".to_string(),
            reason: e.to_string(),
        })
    }

    /// The `state` field of `vm.info` (`Running`, `Paused`, `Shutdown`, ...).
    pub fn vm_state(&self) -> Result<String, Error> {
        let info = self.vm_info()?;
        info.get("state")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::ApiJson {
                path: "vm.info".to_string(),
                reason: format!("no string `state` in {info}"),
            })
    }

    /// Runs `ch-remote --api-socket <socket> <args>` to completion.
    pub fn ch_remote<I, S>(&self, args: I) -> Result<Output, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let socket = self.socket()?;
        Command::new(&self.bins.ch_remote)
            .arg("--api-socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: self.bins.ch_remote.clone(),
                source,
            })
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill_group();
            // Reap it, so no zombie outlives the test; nothing useful to do on error.
            let _ = self.child.wait();
        }
    }
}

/// Makes the child started by `cmd` die with the thread that starts it. A test that times
/// out is killed without its Drop running; without this its VMMs and daemons would run on,
/// busy guests and all, and take CPU from every test and benchmark after it.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_dies_with_the_thread_that_started_it() {
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            die_with_parent(&mut cmd);
            cmd.spawn().unwrap()
        })
        .join()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = crate::wait::poll_until(deadline, || child.try_wait()).unwrap();
        let status = status.expect("the child outlived the thread that started it");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn builder_args() {
        let b = VmmBuilder::new(Binaries::in_dir(Path::new("/x")))
            .kernel("/k")
            .cmdline("mem=16M tick=100")
            .cpus(4)
            .memory("size=64M");
        let args: Vec<String> = b
            .args(Path::new("/t"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--kernel",
                "/k",
                "--cmdline",
                "mem=16M tick=100",
                "--cpus",
                "boot=4",
                "--memory",
                "size=64M",
                "--serial",
                "file=/t/serial.log",
                "--console",
                "off",
                "--api-socket",
                "/t/api.sock",
                "--event-monitor",
                "path=/t/events.json"
            ]
        );
        let raw = VmmBuilder::new(Binaries::in_dir(Path::new("/x"))).raw_args(["--foo"]);
        assert_eq!(raw.args(Path::new("/t")), vec![OsString::from("--foo")]);
    }

    /// A stand-in "VMM" (a shell script) proves spawn, serial waits, exit detection
    /// and kill-on-drop without KVM.
    #[test]
    fn fake_vmm_lifecycle() {
        let script = "printf 'TG boot nonce=ab cpus=1 mem=1 mode=x\\n' > serial.log; \
                      for i in 1 2 3; do \
                      echo \"TG tick n=$i nonce=ab gen=$i verified=$i errors=0\" >> serial.log; \
                      done; echo oops >&2; exit 3";
        let bins = Binaries::new("/bin/sh", "/bin/false");
        let mut vmm = VmmBuilder::new(bins.clone())
            .raw_args(["-c", script])
            .spawn()
            .unwrap();
        let (_, boot) = vmm.wait_boot(Duration::from_secs(10)).unwrap();
        assert_eq!(boot.nonce, 0xab);
        let (next, ticks) = vmm.wait_ticks(3, 0, Duration::from_secs(10)).unwrap();
        assert_eq!(next, 4);
        assert_eq!(ticks.iter().map(|t| t.n).collect::<Vec<_>>(), [1, 2, 3]);
        let status = vmm.expect_exit(Duration::from_secs(10)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(vmm.stderr(), "oops\n");
        let err = vmm.wait_tick(4, Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, Error::VmmExited { .. }), "{err}");
        assert!(err.to_string().contains("oops"), "{err}");

        let mut vmm = VmmBuilder::new(bins)
            .raw_args(["-c", "exec sleep 30"])
            .spawn()
            .unwrap();
        assert_eq!(vmm.wait_exit(Duration::from_millis(50)).unwrap(), None);
        let pid = libc::pid_t::try_from(vmm.pid()).unwrap();
        let dir = vmm.tmp_dir().to_path_buf();
        drop(vmm);
        // SAFETY: signal 0 only probes whether the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "the child survived drop");
        assert!(!dir.exists());
    }
}
