//! Reading a whole request into a typed [`Request`], with every peer-chosen length checked
//! against [`Limits`].

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::framing::{read_payload, read_request_header, send_request};
use crate::memory::{DEFAULT_MAX_RANGE_TABLE_BYTES, MemoryRangeTable};
use crate::page_fault::{MAX_PAGE_FAULT_LENGTH, read_page_fault_body};
use crate::protocol::{Command, MEMORY_FD_PAYLOAD_SIZE, RequestHeader};

/// Default cap for a `Config` or `State` JSON payload (64 MiB).
pub const DEFAULT_MAX_JSON_PAYLOAD: u64 = 64 << 20;

/// Upper bounds on what a peer may announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `Config`/`State` payload.
    pub max_json_payload: u64,
    /// Largest `Memory` range table, in bytes (16 per range).
    pub max_range_table: u64,
    /// Largest `PageFault` length.
    pub max_page_fault: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_json_payload: DEFAULT_MAX_JSON_PAYLOAD,
            max_range_table: DEFAULT_MAX_RANGE_TABLE_BYTES,
            max_page_fault: MAX_PAGE_FAULT_LENGTH,
        }
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `Start`, with the sender's version (check it with [`crate::check_version`]).
    Start {
        /// Protocol version from the header.
        version: u16,
    },
    /// `Config`: raw JSON `VmMigrationConfig` bytes.
    Config(Vec<u8>),
    /// `State`: raw JSON `Snapshot` bytes.
    State(Vec<u8>),
    /// `Memory`: the range table. **The page data is still on the stream**: the caller
    /// must read `table.total_bytes()` bytes, range after range, before anything else.
    Memory(MemoryRangeTable),
    /// `Complete`.
    Complete,
    /// `CompletePaused`.
    CompletePaused,
    /// `Abandon`.
    Abandon,
    /// `MemoryFd` header only. Its payload carries an fd and is still on the stream:
    /// receive it with [`crate::fd::recv_memory_fd_payload`]. This only works if the
    /// reader given to [`read_request`] was the raw `UnixStream` (no buffering).
    MemoryFd,
    /// `PageFault` (fault connection only).
    PageFault(crate::memory::MemoryRange),
}

impl Request {
    /// The command this request came as.
    pub fn command(&self) -> Command {
        match self {
            Request::Start { .. } => Command::Start,
            Request::Config(_) => Command::Config,
            Request::State(_) => Command::State,
            Request::Memory(_) => Command::Memory,
            Request::Complete => Command::Complete,
            Request::CompletePaused => Command::CompletePaused,
            Request::Abandon => Command::Abandon,
            Request::MemoryFd => Command::MemoryFd,
            Request::PageFault(_) => Command::PageFault,
        }
    }
}

/// Reads one request: the header, then the payload as its command defines it.
///
/// Errors: unknown command, the `Invalid` command, a payload length that the command does
/// not carry (commands without payload must announce 0, `MemoryFd` 4, `PageFault` 16), a
/// length above `limits`, a malformed range table or page fault, or a short read.
pub fn read_request<R: Read>(r: &mut R, limits: &Limits) -> Result<Request> {
    let header = read_request_header(r)?;
    let len = header.length();
    let exact = |expected: u64| {
        if len == expected {
            Ok(())
        } else {
            Err(Error::PayloadLength {
                command: header.command(),
                got: len,
                expected,
            })
        }
    };
    Ok(match header.command() {
        Command::Invalid => {
            return Err(Error::UnexpectedCommand {
                command: Command::Invalid,
                expected: "a valid command",
            });
        }
        Command::Start => {
            exact(0)?;
            Request::Start {
                version: header.version(),
            }
        }
        Command::Config => Request::Config(read_payload(r, len, limits.max_json_payload)?),
        Command::State => Request::State(read_payload(r, len, limits.max_json_payload)?),
        Command::Memory => {
            Request::Memory(MemoryRangeTable::read_from(r, len, limits.max_range_table)?)
        }
        Command::Complete => {
            exact(0)?;
            Request::Complete
        }
        Command::CompletePaused => {
            exact(0)?;
            Request::CompletePaused
        }
        Command::Abandon => {
            exact(0)?;
            Request::Abandon
        }
        Command::MemoryFd => {
            exact(MEMORY_FD_PAYLOAD_SIZE)?;
            Request::MemoryFd
        }
        Command::PageFault => {
            Request::PageFault(read_page_fault_body(r, &header, limits.max_page_fault)?)
        }
    })
}

/// Sends a `Memory` request's header and range table. The caller then writes the page
/// data (`table.total_bytes()` bytes, in table order) and reads the response. Cloud
/// Hypervisor never sends an empty table; skip the request when there is nothing to send.
pub fn send_memory_table<W: Write>(w: &mut W, table: &MemoryRangeTable) -> Result<()> {
    send_request(
        w,
        &RequestHeader::memory(table.encoded_len()),
        &table.to_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::memory::MemoryRange;
    use crate::page_fault::send_page_fault;

    fn read(bytes: Vec<u8>) -> Result<Request> {
        read_request(&mut Cursor::new(bytes), &Limits::default())
    }

    #[test]
    fn spec_memory_request_with_data() {
        let table = MemoryRangeTable::from_ranges([
            MemoryRange::new(0x1000, 0x2000),
            MemoryRange::new(0x9000, 0x1000),
        ])
        .unwrap();
        let mut wire = Vec::new();
        send_memory_table(&mut wire, &table).unwrap();
        wire.extend(std::iter::repeat_n(0xab, 0x3000));
        assert_eq!(&wire[..16], &RequestHeader::memory(0x20).to_bytes());
        assert_eq!(wire.len(), 16 + 0x20 + 0x3000);

        let mut r = Cursor::new(wire);
        let Request::Memory(got) = read_request(&mut r, &Limits::default()).unwrap() else {
            panic!("not Memory");
        };
        assert_eq!(got, table);
        // The page data is left for the caller.
        assert_eq!(r.position(), 48);
        assert_eq!(got.total_bytes(), 0x3000);
    }

    #[test]
    fn every_command_round_trips() {
        let cases: Vec<(Vec<u8>, Request)> = vec![
            (
                RequestHeader::start().to_bytes().to_vec(),
                Request::Start { version: 0 },
            ),
            (
                [RequestHeader::config(2).to_bytes().to_vec(), b"{}".to_vec()].concat(),
                Request::Config(b"{}".to_vec()),
            ),
            (
                [RequestHeader::state(3).to_bytes().to_vec(), b"[1]".to_vec()].concat(),
                Request::State(b"[1]".to_vec()),
            ),
            (
                RequestHeader::complete().to_bytes().to_vec(),
                Request::Complete,
            ),
            (
                RequestHeader::complete_paused().to_bytes().to_vec(),
                Request::CompletePaused,
            ),
            (
                RequestHeader::abandon().to_bytes().to_vec(),
                Request::Abandon,
            ),
            (
                RequestHeader::memory_fd().to_bytes().to_vec(),
                Request::MemoryFd,
            ),
        ];
        for (wire, want) in cases {
            assert_eq!(read(wire).unwrap(), want);
        }
        let mut wire = Vec::new();
        send_page_fault(&mut wire, MemoryRange::new(0x4000, 0x1000)).unwrap();
        assert_eq!(
            read(wire).unwrap(),
            Request::PageFault(MemoryRange::new(0x4000, 0x1000))
        );
    }

    #[test]
    fn malformed_requests() {
        let mut invalid = [0u8; 16];
        assert!(matches!(
            read(invalid.to_vec()),
            Err(Error::UnexpectedCommand {
                command: Command::Invalid,
                ..
            })
        ));
        invalid[0] = 42;
        assert_eq!(
            read(invalid.to_vec()).unwrap_err().to_string(),
            "peer sent unknown command 42"
        );

        for h in [
            RequestHeader::new(Command::Start, 1),
            RequestHeader::new(Command::Complete, 8),
            RequestHeader::new(Command::CompletePaused, 1),
            RequestHeader::new(Command::Abandon, 1),
            RequestHeader::new(Command::MemoryFd, 0),
            RequestHeader::new(Command::PageFault, 32),
        ] {
            let e = read(h.to_bytes().to_vec()).unwrap_err();
            assert!(matches!(e, Error::PayloadLength { .. }), "{h:?}: {e}");
        }

        let e = read(RequestHeader::config(u64::MAX).to_bytes().to_vec()).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        let e = read(RequestHeader::memory(17).to_bytes().to_vec()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "range table length 17 is not a multiple of 16"
        );
        let e = read(RequestHeader::memory(1 << 40).to_bytes().to_vec()).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        let e = read(RequestHeader::state(10).to_bytes().to_vec()).unwrap_err();
        assert!(matches!(e, Error::ConnectionClosed { .. }), "{e}");
    }

    #[test]
    fn truncated_at_every_byte() {
        let mut wire = Vec::new();
        send_request(&mut wire, &RequestHeader::config(4), b"abcd").unwrap();
        for cut in 0..wire.len() {
            assert!(read(wire[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        assert!(read(wire).is_ok());
    }
}
