//! The paths `bench --compare` measures, as [`Scenario`]s that run on any side (ours or
//! another Cloud-Hypervisor-compatible set of binaries). Each repetition boots its own
//! guest (2 vCPUs, `--memory size=<ram>,shared=on`) and takes every figure from
//! outside the VMM: serial lines stamped as they arrive ([`GuestClock`]), process exits
//! and /proc. Figures only our VMM reports come as extra metrics on our side only
//! (prefixed `vmm_`).
//!
//! Only interfaces both VMMs share are used: REST bodies with Cloud Hypervisor's field
//! names (which ours accepts too), and the offload daemon subcommands both daemons have
//! with the same syntax (`snapshot --socket S --output-dir D`, `restore --socket S
//! --input-dir D --resume [--ondemand]`).

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use test_infra::daemon::DaemonProcess;
use test_infra::{TempDir, VmmProcess, api_client};

use crate::clock::{GuestClock, check_clean};
use crate::snapshot::Cache;
use crate::{Ctx, Sample, Scenario};

/// Guest tick period: short, so a first tick or a gap is seen to within ~20 ms.
pub const TICK_MS: u64 = 20;
/// Pre-copy's downtime goal, the same for both VMMs (Cloud Hypervisor's default is 300).
const DOWNTIME_MS: u64 = 20;
/// The longest any step may take (a 4 GiB post-copy takes minutes on some VMMs).
const STEP: Duration = Duration::from_secs(300);
/// Dirty rate of the migrating guest, MiB/s.
const DIRTY_RATE: u64 = 64;

/// A guest of `ram_mib` whose workload covers `touched_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub ram_mib: u64,
    pub touched_mib: u64,
}

impl std::str::FromStr for Size {
    type Err = String;
    /// `RAM:TOUCHED` in MiB, e.g. `1024:768`.
    fn from_str(s: &str) -> Result<Size, String> {
        let (ram, touched) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected RAM:TOUCHED in MiB, e.g. 1024:768"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|e| format!("{s:?}: {v:?} is not a number of MiB: {e}"))
        };
        let size = Size {
            ram_mib: num(ram)?,
            touched_mib: num(touched)?,
        };
        if size.touched_mib == 0 || size.touched_mib >= size.ram_mib {
            return Err(format!("{s:?}: TOUCHED must be above 0 and below RAM"));
        }
        Ok(size)
    }
}

impl Size {
    fn name(self) -> String {
        format!("{}M_ram/{}M_touched", self.ram_mib, self.touched_mib)
    }
}

/// The groups of paths, each sharing one source guest per repetition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Daemon snapshot, eager and on-demand daemon restores.
    Offload,
    /// vm.snapshot, vm.restore by copy and on demand.
    Snapshot,
    /// Pre-copy over TCP with 4 connections.
    Precopy,
    /// Post-copy over TCP.
    Postcopy,
    /// Local migration (memory handed over as fds).
    Local,
}

impl Group {
    pub const ALL: [Group; 5] = [
        Group::Offload,
        Group::Snapshot,
        Group::Precopy,
        Group::Postcopy,
        Group::Local,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Group::Offload => "offload",
            Group::Snapshot => "snapshot",
            Group::Precopy => "precopy_tcp4",
            Group::Postcopy => "postcopy_tcp",
            Group::Local => "local",
        }
    }

    pub fn parse(s: &str) -> Result<Group, String> {
        Group::ALL
            .into_iter()
            .find(|g| g.key() == s || g.key().split('_').next() == Some(s))
            .ok_or_else(|| {
                let keys: Vec<&str> = Group::ALL.iter().map(|g| g.key()).collect();
                format!("unknown path group {s:?} (one of {})", keys.join(", "))
            })
    }
}

/// One group of paths at one size.
pub struct ComparePath {
    pub group: Group,
    pub size: Size,
    pub cache: Cache,
}

/// The scenario name `compare/<group>/<ram>M_ram/<touched>M_touched`: the group is the
/// second word, the size the rest.
pub fn scenario_name(group: Group, size: Size) -> String {
    format!("compare/{}/{}", group.key(), size.name())
}

impl Scenario for ComparePath {
    fn name(&self) -> String {
        scenario_name(self.group, self.size)
    }

    fn cpus(&self) -> u8 {
        2
    }

    fn run_once(&self, ctx: &Ctx) -> anyhow::Result<Vec<Sample>> {
        let dir = TempDir::new(&format!("bench-cmp-{}", self.group.key()))?;
        let run = Run {
            ctx,
            size: self.size,
            fifo: dir.join("serial"),
            dir: dir.path(),
        };
        match self.group {
            Group::Offload => run.offload(self.cache),
            Group::Snapshot => run.snapshot(self.cache),
            Group::Precopy => run.migrate(Migration::Precopy4),
            Group::Postcopy => run.migrate(Migration::Postcopy),
            Group::Local => run.migrate(Migration::Local),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Migration {
    Precopy4,
    Postcopy,
    Local,
}

/// One repetition on one side.
struct Run<'a> {
    ctx: &'a Ctx,
    size: Size,
    /// The serial path every VM of this repetition writes to (a pipe, see GuestClock).
    fifo: std::path::PathBuf,
    dir: &'a Path,
}

impl Run<'_> {
    /// Boots the source guest and waits for `TG ready` and two clean ticks; returns it
    /// and its nonce.
    fn source(&self, clock: &GuestClock, workload: &str) -> anyhow::Result<(VmmProcess, u64)> {
        let mut vmm = self
            .ctx
            .side
            .vmm("bench-cmp-src")
            .kernel(&self.ctx.kernel)
            .cmdline(format!(
                "mem={}M {workload} tick={TICK_MS}",
                self.size.touched_mib
            ))
            .cpus(2)
            .memory(format!("size={}M,shared=on", self.size.ram_mib))
            .serial_file(&self.fifo)
            .spawn()?;
        vmm.wait_api_ready(STEP)?;
        let ready = clock.wait("the `TG ready` line", STEP, Some(&mut vmm), |lines| {
            Ok(lines
                .iter()
                .find(|l| test_infra::lines::is_kind(&l.text, "ready"))
                .map(|l| l.at))
        })?;
        let (_, tick) = clock.wait("a tick after `TG ready`", STEP, Some(&mut vmm), |l| {
            Ok(crate::clock::ticks(l)?
                .into_iter()
                .find(|(at, _)| *at >= ready))
        })?;
        clock.clean_ticks_after(ready, 2, tick.nonce, STEP, Some(&mut vmm))?;
        Ok((vmm, tick.nonce))
    }

    /// A VMM with no VM, for a restore or an incoming migration, its VM's serial
    /// output into the pipe.
    fn empty_vmm(&self, prefix: &str) -> anyhow::Result<VmmProcess> {
        let mut vmm = self.ctx.side.empty_vmm(prefix, &self.fifo).spawn()?;
        vmm.wait_api_ready(STEP)?;
        Ok(vmm)
    }

    /// Retires `clock` and puts a fresh one at the serial path for what comes next.
    fn next_clock(&self, clock: &mut GuestClock, phase: &str) -> anyhow::Result<()> {
        clock.retire(phase)?;
        *clock = GuestClock::new(&self.fifo)?;
        Ok(())
    }

    fn daemon(&self, args: &[&std::ffi::OsStr], log: &str) -> anyhow::Result<DaemonProcess> {
        let daemon = self.ctx.side.daemon()?;
        DaemonProcess::spawn(daemon, args, &self.dir.join(log))
            .with_context(|| format!("starting {}", daemon.display()))
    }

    /// Daemon snapshot, then an eager and an on-demand daemon restore of it.
    fn offload(&self, cache: Cache) -> anyhow::Result<Vec<Sample>> {
        let mut clock = GuestClock::new(&self.fifo)?;
        let (mut src, nonce) = self.source(&clock, "mode=fill")?;
        let snap = self.dir.join("snap");
        let sock = self.dir.join("snap.sock");
        let mut snapshotter = self.daemon(
            &[
                "snapshot".as_ref(),
                "--socket".as_ref(),
                sock.as_os_str(),
                "--output-dir".as_ref(),
                snap.as_os_str(),
            ],
            "snapshot.log",
        )?;
        let url = format!("unix:{}", sock.display());
        ensure!(
            test_infra::migration::wait_listening(&url, Duration::from_secs(10))?,
            "the snapshot daemon never listened on {url}: {}",
            snapshotter.output()
        );
        let start = Instant::now();
        src.api_with_timeout(
            "PUT",
            "vm.send-migration",
            Some(&format!(r#"{{"destination_url":"{url}","local":true}}"#)),
            STEP,
        )
        .and_then(|r| ok(r, "vm.send-migration"))?;
        let status = snapshotter
            .wait_exit(STEP)?
            .context("the snapshot daemon did not exit")?;
        let snapshot = start.elapsed();
        ensure!(
            status.success(),
            "snapshot daemon: {status}: {}",
            snapshotter.output()
        );
        src.expect_exit(STEP)?;
        drop(src);
        let mut samples = vec![Sample::ms("daemon_snapshot", snapshot)];

        for ondemand in [false, true] {
            self.next_clock(&mut clock, if ondemand { "eager" } else { "snap" })?;
            cache.prepare(&snap, &self.ctx.side.bins)?;
            // Cached, as on a host that runs it routinely: this is about the snapshot.
            std::fs::read(self.ctx.side.daemon()?)?;
            let mut dest = self.empty_vmm("bench-cmp-restored")?;
            let rsock = self.dir.join(format!("restore-{ondemand}.sock"));
            let url = format!("unix:{}", rsock.display());
            let receiver = receive(&dest, &url, ondemand)?;
            let mut args = vec![
                "restore".as_ref(),
                "--socket".as_ref(),
                rsock.as_os_str(),
                "--input-dir".as_ref(),
                snap.as_os_str(),
                "--resume".as_ref(),
            ];
            if ondemand {
                args.push("--ondemand".as_ref());
            }
            let start = Instant::now();
            let mut restorer = self.daemon(&args, &format!("restore-{ondemand}.log"))?;
            let (first, _) = clock
                .first_tick_after(start, STEP, Some(&mut dest))
                .with_context(|| restorer.output())?;
            let status = restorer
                .wait_exit(STEP)?
                .context("the restore daemon did not exit")?;
            let done = start.elapsed();
            ensure!(
                status.success(),
                "restore daemon: {status}: {}",
                restorer.output()
            );
            joined(receiver, "vm.receive-migration")?;
            if ondemand {
                samples.push(Sample::ms("daemon_ondemand_first_tick", first - start));
                samples.push(Sample::ms("daemon_ondemand_done", done));
                samples.push(Sample::new(
                    "rss_after_ondemand",
                    test_infra::procfs::rss_kib(dest.pid())? as f64 / 1024.0,
                    "MiB",
                ));
            } else {
                samples.push(Sample::ms("daemon_eager_first_tick", first - start));
            }
            // Every page the guest checks from here on came through the restore.
            clock.clean_ticks_after(Instant::now(), 3, nonce, STEP, Some(&mut dest))?;
            dest.kill()?;
        }
        Ok(samples)
    }

    /// vm.snapshot (and a `sync`), then vm.restore by copy and on demand.
    fn snapshot(&self, cache: Cache) -> anyhow::Result<Vec<Sample>> {
        let mut clock = GuestClock::new(&self.fifo)?;
        let (mut src, nonce) = self.source(&clock, "mode=fill")?;
        src.api_ok("PUT", "vm.pause", None)?;
        let snap = self.dir.join("snap");
        let took = vm_snapshot(&src, &snap)?;
        src.kill()?;
        drop(src);
        let mut samples = vec![Sample::ms("vm_snapshot", took)];
        for (mode, metric) in [
            ("Copy", "restore_copy_first_tick"),
            ("OnDemand", "restore_ondemand_first_tick"),
        ] {
            self.next_clock(&mut clock, mode)?;
            cache.prepare(&snap, &self.ctx.side.bins)?;
            let mut vmm = self.empty_vmm("bench-cmp-restored")?;
            let body = format!(
                r#"{{"source_url":"file://{}","memory_restore_mode":"{mode}","resume":true}}"#,
                snap.display()
            );
            let start = Instant::now();
            vmm.api_with_timeout("PUT", "vm.restore", Some(&body), STEP)
                .and_then(|r| ok(r, "vm.restore"))?;
            let (first, _) = clock.first_tick_after(start, STEP, Some(&mut vmm))?;
            samples.push(Sample::ms(metric, first - start));
            clock.clean_ticks_after(first, 3, nonce, STEP, Some(&mut vmm))?;
            vmm.kill()?;
        }
        Ok(samples)
    }

    /// A live migration of a guest that keeps rewriting its memory.
    fn migrate(&self, how: Migration) -> anyhow::Result<Vec<Sample>> {
        let mut src_clock = GuestClock::new(&self.fifo)?;
        let (mut src, nonce) = self.source(&src_clock, &format!("mode=dirty rate={DIRTY_RATE}"))?;
        // From here on the source writes into the retired pipe, the destination into
        // the new one: every tick is known to come from one VMM or the other.
        src_clock.retire("src")?;
        let dest_clock = GuestClock::new(&self.fifo)?;
        let mut dest = self.empty_vmm("bench-cmp-dst")?;
        let url = match how {
            Migration::Local => format!("unix:{}", self.dir.join("m.sock").display()),
            _ => format!("tcp:127.0.0.1:{}", test_infra::migration::free_tcp_port()?),
        };
        let postcopy = how == Migration::Postcopy;
        let receiver = receive(&dest, &url, postcopy)?;
        let extra = match how {
            Migration::Precopy4 => r#","connections":4"#,
            Migration::Postcopy => r#","memory_mode":"Postcopy""#,
            Migration::Local => r#","local":true"#,
        };
        let body = format!(
            r#"{{"destination_url":"{url}","downtime_ms":{DOWNTIME_MS},"timeout_s":{},"timeout_strategy":"Cancel"{extra}}}"#,
            STEP.as_secs()
        );
        let start = Instant::now();
        src.api_with_timeout("PUT", "vm.send-migration", Some(&body), STEP)
            .and_then(|r| ok(r, "vm.send-migration"))?;
        let status = src
            .wait_exit(STEP)?
            .context("the source VMM did not exit after the migration")?;
        let source_done = start.elapsed();
        ensure!(
            status.success(),
            "the source VMM exited with {status}: {}",
            src.stderr()
        );
        joined(receiver, "vm.receive-migration")?;
        let (first, _) = dest_clock.first_tick_after(start, STEP, Some(&mut dest))?;
        let last_src = src_clock
            .ticks()?
            .into_iter()
            .map(|(at, _)| at)
            .rfind(|at| *at < first)
            .context("the source printed no tick before the destination's first")?;
        check_clean(&src_clock.lines(), nonce)?;
        dest_clock.clean_ticks_after(first, 3, nonce, STEP, Some(&mut dest))?;

        let mut samples = vec![
            Sample::ms("source_done", source_done),
            Sample::ms("first_tick", first - start),
            Sample::ms("tick_gap", first - last_src),
        ];
        if self.ctx.side.ours {
            samples.extend(our_migration_figures(&src)?);
        }
        Ok(samples)
    }
}

/// What our VMM reports about a finished migration (its `migration-finished` event).
fn our_migration_figures(src: &VmmProcess) -> anyhow::Result<Vec<Sample>> {
    let finished = src
        .events()
        .into_iter()
        .find(|e| e["event"] == "migration-finished")
        .context("our source VMM wrote no migration-finished event")?;
    let prop = |k: &str| -> f64 {
        finished["properties"][k]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Ok(vec![
        Sample::new("vmm_downtime", prop("downtime_us") / 1000.0, "ms"),
        Sample::new("vmm_total", prop("total_ms"), "ms"),
    ])
}

/// `vm.snapshot` into `snap` plus a `sync`, timed. Cloud Hypervisor writes into a
/// directory that exists, ours into one it creates: the directory is made first, and
/// if the VMM refuses it, removed and the call made again (only that call is timed).
fn vm_snapshot(src: &VmmProcess, snap: &Path) -> anyhow::Result<Duration> {
    let body = format!(r#"{{"destination_url":"file://{}"}}"#, snap.display());
    std::fs::create_dir(snap)?;
    let mut start = Instant::now();
    let mut resp = src.api_with_timeout("PUT", "vm.snapshot", Some(&body), STEP)?;
    if !resp.is_success() {
        eprintln!(
            "bench: vm.snapshot into an existing directory: {} {}; again without it",
            resp.status,
            resp.body.trim()
        );
        std::fs::remove_dir(snap)?;
        start = Instant::now();
        resp = src.api_with_timeout("PUT", "vm.snapshot", Some(&body), STEP)?;
    }
    ok(resp, "vm.snapshot")?;
    let status = std::process::Command::new("sync").status()?;
    ensure!(status.success(), "sync: {status}");
    Ok(start.elapsed())
}

fn ok(resp: api_client::Response, what: &str) -> Result<(), test_infra::Error> {
    if resp.is_success() {
        Ok(())
    } else {
        Err(test_infra::Error::ApiStatus {
            method: "PUT".into(),
            path: what.into(),
            status: resp.status,
            body: resp.body,
        })
    }
}

type Receiving = JoinHandle<Result<api_client::Response, api_client::Error>>;

/// `vm.receive-migration` on `dest` in a thread (the call lasts as long as the
/// migration); returns once the receiver listens on `url`. Post-copy is asked for as
/// Cloud Hypervisor names it (`memory_mode`), which ours accepts too.
fn receive(dest: &VmmProcess, url: &str, postcopy: bool) -> anyhow::Result<Receiving> {
    let socket = dest
        .api_socket()
        .context("the VMM has no API socket")?
        .to_path_buf();
    let mode = if postcopy { "Postcopy" } else { "Precopy" };
    let body = format!(r#"{{"receiver_url":"{url}","memory_mode":"{mode}"}}"#);
    let handle = std::thread::spawn(move || {
        api_client::api_command(
            &socket,
            "PUT",
            "vm.receive-migration",
            Some(&body),
            Some(STEP),
        )
    });
    if !test_infra::migration::wait_listening(url, Duration::from_secs(10))? {
        bail!("the destination never listened on {url}: {}", dest.stderr());
    }
    Ok(handle)
}

fn joined(handle: Receiving, what: &str) -> anyhow::Result<()> {
    let resp = handle
        .join()
        .map_err(|_| anyhow::anyhow!("the {what} thread panicked"))?
        .with_context(|| format!("{what} failed"))?;
    ok(resp, what)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_groups_parse() {
        assert_eq!(
            "1024:768".parse::<Size>(),
            Ok(Size {
                ram_mib: 1024,
                touched_mib: 768
            })
        );
        assert!("1024".parse::<Size>().is_err());
        assert!("64:64".parse::<Size>().is_err());
        assert_eq!(Group::parse("precopy"), Ok(Group::Precopy));
        assert_eq!(Group::parse("postcopy_tcp"), Ok(Group::Postcopy));
        assert!(Group::parse("nope").unwrap_err().contains("offload"));
        let name = scenario_name(
            Group::Offload,
            Size {
                ram_mib: 64,
                touched_mib: 32,
            },
        );
        assert_eq!(name, "compare/offload/64M_ram/32M_touched");
    }
}
