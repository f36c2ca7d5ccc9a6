//! A stand-in for Cloud Hypervisor's reference offload daemon in restore mode, for CI
//! (which cannot run Cloud Hypervisor). It replays a directory in that daemon's layout
//! (`migration_config.json`, `state.json`, `memory-<slot>`; no manifest) into a VMM
//! waiting in `receive-migration`, behaving as that daemon does (its behaviour is written
//! down in the design doc `migration-protocol.md`, §4 and §5.3):
//!
//! * `Start`, one `MemoryFd` per `guest_ram_mappings` entry (a memfd of `file_offset +
//!   size` bytes: filled from `memory-<slot>` when eager, empty on demand), `Config` (the
//!   file's bytes), on demand a fault connection (role 2) before `State`, then `State`
//!   and `Complete` (`--resume`) or `CompletePaused`.
//! * On demand, every `PageFault` is answered by writing the whole requested range from
//!   `memory-<slot>` into the memfd (holes as zeros), however often a page is asked for,
//!   then `Ok` with length 0; the connection's EOF or `Abandon` ends the serving.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_migration::{ConnectionRole, FaultRequest, MAX_PAGE_FAULT_LENGTH, RequestHeader, Status};

/// The file names of that daemon's directory.
pub const CONFIG_FILE: &str = "migration_config.json";
pub const STATE_FILE: &str = "state.json";

/// How long any answer of the VMM may take before the replay fails.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `Complete` (the VM runs) instead of `CompletePaused`.
    pub resume: bool,
    /// Empty memfds and a fault connection, as `--ondemand`.
    pub ondemand: bool,
    /// Added before answering a request for more than one page: a slow disk, so that
    /// guest faults overtake the VMM's background requests.
    pub bulk_delay: Duration,
}

/// What the replay saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub page_faults: u64,
    /// Pages written more than once (asked for again after they were served).
    pub pages_rewritten: u64,
}

/// One `guest_ram_mappings` entry.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    slot: u32,
    gpa: u64,
    size: u64,
    file_offset: u64,
}

struct Slot {
    mapping: Mapping,
    memfd: File,
    disk: File,
    served: Vec<bool>,
}

/// Replays `dir` into the VMM listening on `socket` (its `receive-migration` socket).
pub fn restore(socket: &Path, dir: &Path, opts: &Options) -> io::Result<Report> {
    let config = std::fs::read(dir.join(CONFIG_FILE))?;
    let state = std::fs::read(dir.join(STATE_FILE))?;
    let mut slots = Vec::new();
    for m in mappings(&config)? {
        let disk = File::open(memory_file(dir, m.slot))?;
        let memfd =
            vmm::memory_manager::create_memfd(m.file_offset + m.size).map_err(io::Error::other)?;
        if !opts.ondemand {
            copy_data(&disk, &memfd, m)?;
        }
        let pages = usize::try_from(m.size / 4096).map_err(io::Error::other)?;
        slots.push(Slot {
            mapping: m,
            memfd,
            disk,
            served: vec![false; pages],
        });
    }

    let mut conn = connect(socket)?;
    request(&mut conn, &RequestHeader::start(), &[], "Start")?;
    for s in &slots {
        vm_migration::send_memory_fd(&conn, s.mapping.slot, &s.memfd).map_err(io::Error::other)?;
        expect_ok(&mut conn, "MemoryFd")?;
    }
    request(
        &mut conn,
        &RequestHeader::config(config.len() as u64),
        &config,
        "Config",
    )?;
    let server = if opts.ondemand {
        let mut fault = connect(socket)?;
        vm_migration::write_role(&mut fault, ConnectionRole::Fault).map_err(io::Error::other)?;
        // Only a request that has started may be waited for: the VMM may stay quiet.
        fault.set_read_timeout(None)?;
        let delay = opts.bulk_delay;
        Some(std::thread::spawn(move || serve(fault, slots, delay)))
    } else {
        None
    };
    request(
        &mut conn,
        &RequestHeader::state(state.len() as u64),
        &state,
        "State",
    )?;
    let last = if opts.resume {
        RequestHeader::complete()
    } else {
        RequestHeader::complete_paused()
    };
    request(&mut conn, &last, &[], "Complete")?;
    match server {
        Some(t) => t
            .join()
            .map_err(|_| io::Error::other("the fault server panicked"))?,
        None => Ok(Report::default()),
    }
}

/// `dir/memory-<slot>`.
pub fn memory_file(dir: &Path, slot: u32) -> PathBuf {
    dir.join(format!("memory-{slot}"))
}

fn mappings(config: &[u8]) -> io::Result<Vec<Mapping>> {
    let v: serde_json::Value = serde_json::from_slice(config)?;
    let list = v["memory_manager_data"]["guest_ram_mappings"]
        .as_array()
        .ok_or_else(|| io::Error::other("no memory_manager_data.guest_ram_mappings"))?;
    list.iter()
        .map(|m| {
            let field = |k: &str| {
                m[k].as_u64()
                    .ok_or_else(|| io::Error::other(format!("guest_ram_mappings: no {k}")))
            };
            Ok(Mapping {
                slot: u32::try_from(field("slot")?).map_err(io::Error::other)?,
                gpa: field("gpa")?,
                size: field("size")?,
                file_offset: field("file_offset")?,
            })
        })
        .collect()
}

/// The data extents of `disk` into `memfd` at the mapping's file offset; holes stay holes.
fn copy_data(disk: &File, memfd: &File, m: Mapping) -> io::Result<()> {
    let mut buf = Vec::new();
    for e in vmm::sparse::file_data_extents(disk, 0, m.size)? {
        buf.resize(usize::try_from(e.len).map_err(io::Error::other)?, 0);
        disk.read_exact_at(&mut buf, e.offset)?;
        memfd.write_all_at(&buf, m.file_offset + e.offset)?;
    }
    Ok(())
}

fn connect(socket: &Path) -> io::Result<UnixStream> {
    let conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

fn request(
    conn: &mut UnixStream,
    header: &RequestHeader,
    payload: &[u8],
    what: &str,
) -> io::Result<()> {
    vm_migration::send_request(conn, header, payload).map_err(io::Error::other)?;
    expect_ok(conn, what)
}

fn expect_ok(conn: &mut UnixStream, what: &str) -> io::Result<()> {
    let status = vm_migration::read_response(conn)
        .map_err(io::Error::other)?
        .status;
    if status == Status::Ok {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the VMM answered {status} to {what}"
        )))
    }
}

fn serve(mut conn: UnixStream, mut slots: Vec<Slot>, bulk_delay: Duration) -> io::Result<Report> {
    let mut report = Report::default();
    loop {
        let range =
            match vm_migration::page_fault::read_fault_request(&mut conn, MAX_PAGE_FAULT_LENGTH) {
                Ok(Some(FaultRequest::PageFault(range))) => range,
                Ok(Some(FaultRequest::Abandon)) => {
                    vm_migration::send_response(&mut conn, Status::Ok, &[])
                        .map_err(io::Error::other)?;
                    return Ok(report);
                }
                Ok(None) => return Ok(report),
                Ok(Some(other)) => return Err(io::Error::other(format!("unexpected {other:?}"))),
                Err(e) if e.is_closed_between_messages() => return Ok(report),
                Err(e) => return Err(io::Error::other(e)),
            };
        report.page_faults += 1;
        if range.length > 4096 && !bulk_delay.is_zero() {
            std::thread::sleep(bulk_delay);
        }
        let slot = slots
            .iter_mut()
            .find(|s| {
                range.gpa >= s.mapping.gpa
                    && range.gpa.saturating_add(range.length) <= s.mapping.gpa + s.mapping.size
            })
            .ok_or_else(|| {
                io::Error::other(format!(
                    "PageFault {:#x}+{} is in no slot",
                    range.gpa, range.length
                ))
            })?;
        let offset = range.gpa - slot.mapping.gpa;
        // The whole range, holes read as zeros, whether served before or not.
        let mut buf = vec![0u8; usize::try_from(range.length).map_err(io::Error::other)?];
        slot.disk.read_exact_at(&mut buf, offset)?;
        slot.memfd
            .write_all_at(&buf, slot.mapping.file_offset + offset)?;
        for page in offset / 4096..(offset + range.length).div_ceil(4096) {
            let served = &mut slot.served[page as usize];
            report.pages_rewritten += u64::from(*served);
            *served = true;
        }
        vm_migration::page_fault::send_page_written_to_memfd(&mut conn)
            .map_err(io::Error::other)?;
    }
}
