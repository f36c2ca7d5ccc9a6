//! The crate's single error type.
//!
//! Every problem a peer can cause (unknown values, absurd lengths, a connection closed in
//! the middle of a message) is an [`Error`] value; nothing in this crate panics on peer
//! input. Messages name the offending value so that a log line alone says what went wrong.

use std::fmt;
use std::io;

use crate::protocol::{Command, Status};

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while encoding, decoding, sending or receiving a message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed; `op` names the step (e.g. "writing a request header").
    #[error("I/O error while {op}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading a message failed with an I/O error (reset, timeout, ...).
    #[error("I/O error while reading {what}")]
    Read {
        /// What was being read (e.g. "a response header").
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection before sending the first byte of a message.
    #[error("connection closed by peer while reading {what}")]
    ConnectionClosed {
        /// What was expected (e.g. "a request header").
        what: &'static str,
    },
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed by peer after {got} of {expected} bytes of {what}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes received before the end of stream.
        got: u64,
        /// Bytes the message should have had.
        expected: u64,
    },
    /// A request header carries a command number this protocol does not define.
    #[error("peer sent unknown command {0}")]
    UnknownCommand(u16),
    /// A request header carries a known command that is not acceptable here.
    #[error("peer sent the {command} command, expected {expected}")]
    UnexpectedCommand {
        /// The command received.
        command: Command,
        /// What the reader accepts at this point.
        expected: &'static str,
    },
    /// A response header carries a status number this protocol does not define.
    #[error("peer sent unknown response status {0}")]
    UnknownStatus(u16),
    /// The peer answered with something other than `Ok`.
    ///
    /// The protocol transports no error text: the cause is only in the peer's log.
    #[error("peer answered {0} (the reason is only in the peer's log)")]
    NotOk(Status),
    /// A response that must be bare (length 0) announced a payload.
    #[error("peer's response announces a {0}-byte payload where none is allowed")]
    UnexpectedResponsePayload(u64),
    /// A `Start` request carried a protocol version this crate cannot speak.
    #[error("peer speaks protocol version {version}, supported: {min}..={max}")]
    UnsupportedVersion {
        /// Version sent by the peer.
        version: u16,
        /// Oldest supported version.
        min: u16,
        /// Newest supported version.
        max: u16,
    },
    /// A connection started with role 0 (`Invalid`).
    #[error("peer opened a connection with the invalid role 0")]
    InvalidConnectionRole,
    /// A connection started with a role number this protocol does not define.
    #[error("peer opened a connection with unknown role {0}")]
    UnknownConnectionRole(u16),
    /// A length announced by the peer (or asked of us) is above the configured limit.
    #[error("{what} of {length} bytes exceeds the {} limit", HumanBytes(*limit))]
    TooLarge {
        /// What the length is for (e.g. "payload", "range table").
        what: &'static str,
        /// The announced length.
        length: u64,
        /// The limit in force.
        limit: u64,
    },
    /// A range table's byte length is not a whole number of 16-byte entries.
    #[error("range table length {0} is not a multiple of 16")]
    RangeTableLength(u64),
    /// A memory range whose end lies beyond the 64-bit address space.
    #[error("memory range at gpa {gpa:#x} with length {length:#x} overflows the address space")]
    RangeOverflow {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        length: u64,
    },
    /// The ranges of one table add up to more than `u64::MAX` bytes of page data.
    #[error("memory range table describes more than u64::MAX bytes of data")]
    RangeTableTotalOverflow,
    /// A request's announced payload length does not match what its command carries.
    #[error("{command} request announces a {got}-byte payload, the command carries {expected}")]
    PayloadLength {
        /// The command.
        command: Command,
        /// The length in the header.
        got: u64,
        /// The length the command requires.
        expected: u64,
    },
    /// A `PageFault` asked for 0 bytes or more than the limit.
    #[error("PageFault for gpa {gpa:#x} asks for {length} bytes, allowed 1..={max}")]
    PageFaultLength {
        /// Start of the requested page.
        gpa: u64,
        /// Requested length.
        length: u64,
        /// Largest length accepted.
        max: u64,
    },
    /// A `PageFault` response announced the wrong amount of inline data.
    #[error("PageFault response announces {got} bytes, expected {expected} ({mode})")]
    PageFaultResponseLength {
        /// Length in the response header.
        got: u64,
        /// Length the requester expects.
        expected: u64,
        /// Why that length is expected.
        mode: &'static str,
    },
    /// `MemoryFd` must go through [`crate::fd::send_memory_fd`], which attaches the fd.
    #[error("MemoryFd cannot be sent as a plain request; use fd::send_memory_fd")]
    MemoryFdNeedsSocket,
    /// The `MemoryFd` payload arrived without a file descriptor (e.g. over TCP).
    #[error("MemoryFd for slot {0} arrived without a file descriptor")]
    NoFdReceived(u32),
    /// The `MemoryFd` payload carried more than one file descriptor (all were closed).
    #[error("MemoryFd payload carried more than one file descriptor")]
    TooManyFds,
}

impl Error {
    /// Wraps an I/O error with the name of the failing step.
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { op, source }
    }

    /// True if the peer closed the connection cleanly *between* messages.
    ///
    /// Several loops treat that as a normal end: a PrecopyMemory worker after its last
    /// `Memory` request, or a PageFault server once the destination has every page.
    pub fn is_closed_between_messages(&self) -> bool {
        matches!(self, Error::ConnectionClosed { .. })
    }
}

/// Formats a byte count as "64 MiB" / "1 GiB" when exact, else "N bytes".
pub(crate) struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, name) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {name}", self.0 / size);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_values() {
        let e = Error::TooLarge {
            what: "payload",
            length: 9_223_372_036_854_775_807,
            limit: 64 << 20,
        };
        assert_eq!(
            e.to_string(),
            "payload of 9223372036854775807 bytes exceeds the 64 MiB limit"
        );
        assert_eq!(
            Error::RangeTableLength(17).to_string(),
            "range table length 17 is not a multiple of 16"
        );
        assert_eq!(
            Error::UnknownCommand(42).to_string(),
            "peer sent unknown command 42"
        );
        assert_eq!(
            Error::ConnectionClosed {
                what: "a request header"
            }
            .to_string(),
            "connection closed by peer while reading a request header"
        );
    }

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(1 << 30).to_string(), "1 GiB");
        assert_eq!(HumanBytes(3 << 10).to_string(), "3 KiB");
        assert_eq!(HumanBytes(1000).to_string(), "1000 bytes");
        assert_eq!(HumanBytes(0).to_string(), "0 bytes");
    }
}
