//! Request and response headers, command numbers, statuses and the protocol version
//! (spec §1.1-§1.4, §10).
//!
//! Both headers are 16 bytes. They are encoded field by field in little-endian order, which
//! is what Cloud Hypervisor's `repr(C)` images amount to on every host it runs on.

use std::fmt;
use std::ops::RangeInclusive;

use crate::error::{Error, Result};
use crate::memory::MEMORY_RANGE_SIZE;

/// Size of a request header and of a response header on the wire.
pub const HEADER_SIZE: usize = 16;

/// The protocol version this crate sends in `Start`.
pub const CURRENT_PROTOCOL_VERSION: u16 = 0;

/// Length of the `MemoryFd` payload: the u32 slot id.
pub const MEMORY_FD_PAYLOAD_SIZE: u64 = 4;

/// The versions a receiver accepts: the current one and the one before it (saturating, so
/// exactly `{0}` today), as Cloud Hypervisor does.
pub fn supported_versions() -> RangeInclusive<u16> {
    CURRENT_PROTOCOL_VERSION.saturating_sub(1)..=CURRENT_PROTOCOL_VERSION
}

/// Returns an error unless `version` is one [`supported_versions`] contains.
pub fn check_version(version: u16) -> Result<()> {
    let supported = supported_versions();
    if supported.contains(&version) {
        Ok(())
    } else {
        Err(Error::UnsupportedVersion {
            version,
            min: *supported.start(),
            max: *supported.end(),
        })
    }
}

/// A request's command number (spec §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Never sent; receiving it is an error.
    Invalid = 0,
    /// Opens the session; carries the sender's protocol version in the header.
    Start = 1,
    /// JSON `VmMigrationConfig` payload.
    Config = 2,
    /// JSON `Snapshot` payload.
    State = 3,
    /// A range table, followed by the raw bytes of every range (not counted in `length`).
    Memory = 4,
    /// Resume the VM on the receiver.
    Complete = 5,
    /// Give up the migration.
    Abandon = 6,
    /// A 4-byte slot id sent with one `SCM_RIGHTS` fd (UNIX sockets only).
    MemoryFd = 7,
    /// Complete, but leave the VM paused.
    CompletePaused = 8,
    /// Ask the source for one page (fault connection only).
    PageFault = 9,
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 10] = [
        Command::Invalid,
        Command::Start,
        Command::Config,
        Command::State,
        Command::Memory,
        Command::Complete,
        Command::Abandon,
        Command::MemoryFd,
        Command::CompletePaused,
        Command::PageFault,
    ];

    /// The number sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for Command {
    type Error = Error;

    fn try_from(value: u16) -> Result<Self> {
        Command::ALL
            .into_iter()
            .find(|c| c.as_u16() == value)
            .ok_or(Error::UnknownCommand(value))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A response's status (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Never meaningful; treated as failure.
    Invalid = 0,
    /// The command succeeded.
    Ok = 1,
    /// The command failed; the reason is only in the peer's log.
    Error = 2,
}

impl Status {
    /// The number sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for Status {
    type Error = Error;

    fn try_from(value: u16) -> Result<Self> {
        match value {
            0 => Ok(Status::Invalid),
            1 => Ok(Status::Ok),
            2 => Ok(Status::Error),
            other => Err(Error::UnknownStatus(other)),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The 16-byte header in front of every request.
///
/// Layout: `command` u16 LE at 0, six per-command bytes at 2 (only `Start` uses them: its
/// protocol version, u16 LE, at 2..4), payload `length` u64 LE at 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    command: Command,
    // Kept 0 for every command but Start, so that `to_bytes` writes zeros there as CH does.
    version: u16,
    length: u64,
}

impl RequestHeader {
    /// A header for `command` announcing `length` payload bytes. `Start` gets
    /// [`CURRENT_PROTOCOL_VERSION`].
    pub fn new(command: Command, length: u64) -> Self {
        let version = if command == Command::Start {
            CURRENT_PROTOCOL_VERSION
        } else {
            0
        };
        RequestHeader {
            command,
            version,
            length,
        }
    }

    /// `Start` with the current protocol version.
    pub fn start() -> Self {
        Self::new(Command::Start, 0)
    }

    /// `Start` announcing an arbitrary version (for tests of version negotiation).
    pub fn start_with_version(version: u16) -> Self {
        RequestHeader {
            command: Command::Start,
            version,
            length: 0,
        }
    }

    /// `Config` with a JSON payload of `len` bytes.
    pub fn config(len: u64) -> Self {
        Self::new(Command::Config, len)
    }

    /// `State` with a JSON payload of `len` bytes.
    pub fn state(len: u64) -> Self {
        Self::new(Command::State, len)
    }

    /// `Memory` whose range table is `table_len` bytes (16 per range). The page data that
    /// follows the table is not counted.
    pub fn memory(table_len: u64) -> Self {
        Self::new(Command::Memory, table_len)
    }

    /// `Complete` (receiver resumes the VM).
    pub fn complete() -> Self {
        Self::new(Command::Complete, 0)
    }

    /// `CompletePaused` (receiver leaves the VM paused).
    pub fn complete_paused() -> Self {
        Self::new(Command::CompletePaused, 0)
    }

    /// `Abandon`.
    pub fn abandon() -> Self {
        Self::new(Command::Abandon, 0)
    }

    /// `MemoryFd`; its 4-byte payload goes with the fd in one `sendmsg`.
    pub fn memory_fd() -> Self {
        Self::new(Command::MemoryFd, MEMORY_FD_PAYLOAD_SIZE)
    }

    /// `PageFault`; its payload is one 16-byte memory range.
    pub fn page_fault() -> Self {
        Self::new(Command::PageFault, MEMORY_RANGE_SIZE as u64)
    }

    /// The command.
    pub fn command(&self) -> Command {
        self.command
    }

    /// The sender's protocol version; only meaningful for `Start` (0 otherwise).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The payload length announced (for `Memory`, the table only).
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.command.as_u16().to_le_bytes());
        b[2..4].copy_from_slice(&self.version.to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decodes a header. Fails only on an unknown command number; the per-command bytes
    /// are ignored except the version of `Start`.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        let command = Command::try_from(u16::from_le_bytes([b[0], b[1]]))?;
        let version = if command == Command::Start {
            u16::from_le_bytes([b[2], b[3]])
        } else {
            0
        };
        Ok(RequestHeader {
            command,
            version,
            length: le_u64(b),
        })
    }
}

/// The 16-byte header of every response: `status` u16 LE at 0, six zero bytes, payload
/// `length` u64 LE at 8 (non-zero only for an inline `PageFault` answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The status.
    pub status: Status,
    /// Bytes following the header.
    pub length: u64,
}

impl ResponseHeader {
    /// `Ok` without payload.
    pub fn ok() -> Self {
        ResponseHeader {
            status: Status::Ok,
            length: 0,
        }
    }

    /// `Error` without payload.
    pub fn error() -> Self {
        ResponseHeader {
            status: Status::Error,
            length: 0,
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.status.as_u16().to_le_bytes());
        b[8..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decodes a header. Fails only on an unknown status; padding is ignored.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        Ok(ResponseHeader {
            status: Status::try_from(u16::from_le_bytes([b[0], b[1]]))?,
            length: le_u64(b),
        })
    }
}

fn le_u64(b: &[u8; HEADER_SIZE]) -> u64 {
    u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect()
    }

    #[test]
    fn spec_start_v0() {
        let want = hex("01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00");
        assert_eq!(RequestHeader::start().to_bytes().to_vec(), want);
        let h = RequestHeader::from_bytes(&RequestHeader::start().to_bytes()).unwrap();
        assert_eq!(h.command(), Command::Start);
        assert_eq!(h.version(), 0);
        assert_eq!(h.length(), 0);
    }

    #[test]
    fn spec_ok_and_error_responses() {
        let ok = hex("01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00");
        assert_eq!(ResponseHeader::ok().to_bytes().to_vec(), ok);
        let mut err = ok.clone();
        err[0] = 0x02;
        assert_eq!(ResponseHeader::error().to_bytes().to_vec(), err);
    }

    #[test]
    fn spec_memory_fd_header() {
        let want = hex("07 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00");
        assert_eq!(RequestHeader::memory_fd().to_bytes().to_vec(), want);
    }

    #[test]
    fn spec_page_fault_header_and_inline_answer() {
        let req = hex("09 00 00 00 00 00 00 00 10 00 00 00 00 00 00 00");
        assert_eq!(RequestHeader::page_fault().to_bytes().to_vec(), req);
        let answer = hex("01 00 00 00 00 00 00 00 00 10 00 00 00 00 00 00");
        let h = ResponseHeader {
            status: Status::Ok,
            length: 0x1000,
        };
        assert_eq!(h.to_bytes().to_vec(), answer);
    }

    #[test]
    fn spec_memory_header_two_ranges() {
        let want = hex("04 00 00 00 00 00 00 00 20 00 00 00 00 00 00 00");
        assert_eq!(RequestHeader::memory(0x20).to_bytes().to_vec(), want);
    }

    #[test]
    fn command_numbers_round_trip() {
        for (n, c) in Command::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(c.as_u16()), n);
            assert_eq!(Command::try_from(c.as_u16()).unwrap(), c);
            let h = RequestHeader::new(c, 0xdead_beef_0102_0304);
            assert_eq!(RequestHeader::from_bytes(&h.to_bytes()).unwrap(), h);
        }
    }

    #[test]
    fn unknown_command_is_an_error() {
        for n in [10u16, 42, 0x100, u16::MAX] {
            let mut b = [0u8; HEADER_SIZE];
            b[0..2].copy_from_slice(&n.to_le_bytes());
            match RequestHeader::from_bytes(&b) {
                Err(Error::UnknownCommand(got)) => assert_eq!(got, n),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unknown_status_is_an_error() {
        for n in [3u16, 0x100, u16::MAX] {
            let mut b = [0u8; HEADER_SIZE];
            b[0..2].copy_from_slice(&n.to_le_bytes());
            assert!(matches!(
                ResponseHeader::from_bytes(&b),
                Err(Error::UnknownStatus(got)) if got == n
            ));
        }
        for (n, s) in [(0, Status::Invalid), (1, Status::Ok), (2, Status::Error)] {
            assert_eq!(Status::try_from(n).unwrap(), s);
        }
    }

    #[test]
    fn ignored_bytes_are_ignored() {
        // Per-command bytes of a non-Start request and response padding carry nothing.
        let mut b = RequestHeader::complete().to_bytes();
        b[2..8].copy_from_slice(&[0xff; 6]);
        let h = RequestHeader::from_bytes(&b).unwrap();
        assert_eq!(h, RequestHeader::complete());
        assert_eq!(h.version(), 0);

        // Start: only bytes 2..4 are the version; 4..8 are ignored.
        let mut b = RequestHeader::start().to_bytes();
        b[4..8].copy_from_slice(&[0xaa; 4]);
        assert_eq!(RequestHeader::from_bytes(&b).unwrap().version(), 0);
        b[2..4].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(RequestHeader::from_bytes(&b).unwrap().version(), 7);

        let mut b = ResponseHeader::ok().to_bytes();
        b[2..8].copy_from_slice(&[0x55; 6]);
        assert_eq!(
            ResponseHeader::from_bytes(&b).unwrap(),
            ResponseHeader::ok()
        );
    }

    #[test]
    fn versions() {
        assert_eq!(supported_versions(), 0..=0);
        check_version(0).unwrap();
        assert!(matches!(
            check_version(1),
            Err(Error::UnsupportedVersion {
                version: 1,
                min: 0,
                max: 0
            })
        ));
        let h = RequestHeader::start_with_version(0x0102);
        assert_eq!(&h.to_bytes()[0..4], &[1, 0, 2, 1]);
    }

    #[test]
    fn little_endian_lengths() {
        let h = RequestHeader::state(0x0102_0304_0506_0708);
        assert_eq!(
            &h.to_bytes()[8..],
            &[0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01]
        );
    }
}
