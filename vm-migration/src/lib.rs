//! Cloud Hypervisor compatible live-migration wire protocol.
//!
//! This crate is the protocol alone: byte layouts, framing over `Read`/`Write`, connection
//! roles and `SCM_RIGHTS` fd passing. It has no KVM, VMM or guest-memory dependency, so a
//! third party can write a migration peer (for instance an offload daemon that stores or
//! serves a VM's memory) with nothing else. Its only `unsafe` is one `recvmsg` call (see [`fd`]).
//!
//! # The protocol in one screen
//!
//! * Every request is a 16-byte [`RequestHeader`] (command, `Start`'s version, payload
//!   length) plus a payload; every response is a 16-byte [`ResponseHeader`] (status,
//!   payload length). All integers are little-endian. One request, one response, in
//!   lock-step; no error text is ever transported.
//! * Main connection (no prefix): `Start` → [`MemoryFd`](Command::MemoryFd)* → `Config`
//!   (JSON) → `Memory`* → `State` (JSON) → `Complete` | `CompletePaused`. `Abandon` any
//!   time. See [`Request`] and [`read_request`] for the receiving side, [`send_request`]
//!   and [`expect_ok`] for the sending side.
//! * Additional connections start with a [`ConnectionRole`]: `PrecopyMemory` carries
//!   `Memory` requests ([`MemoryRangeTable::split_into_chunks`] with
//!   [`MEMORY_CHUNK_SIZE`]); `Fault` carries [`page_fault`] requests sent by the
//!   *destination*.
//! * `MemoryFd` hands a memfd over a UNIX socket ([`fd`]). Headers that precede it must be
//!   read unbuffered, exactly 16 bytes at a time, or the fd is lost.
//!
//! JSON payloads (`Config`, `State`) are opaque bytes here: a daemon should store and replay
//! them byte for byte.
//!
//! # Example
//!
//! A `Config` request and its answer, over in-memory buffers:
//!
//! ```
//! use std::io::Cursor;
//! use vm_migration::{Limits, Request, RequestHeader, Status};
//!
//! # fn main() -> vm_migration::Result<()> {
//! let json = br#"{"vm_config":{}}"#;
//! let mut wire = Vec::new();
//! vm_migration::send_request(&mut wire, &RequestHeader::config(json.len() as u64), json)?;
//!
//! let request = vm_migration::read_request(&mut Cursor::new(&wire), &Limits::default())?;
//! assert_eq!(request, Request::Config(json.to_vec()));
//!
//! let mut answer = Vec::new();
//! vm_migration::send_response(&mut answer, Status::Ok, &[])?;
//! vm_migration::expect_ok(&mut Cursor::new(&answer))?;
//! # Ok(())
//! # }
//! ```
//!
//! # Trust
//!
//! Every decoder treats its input as hostile: unknown numbers, lengths that are not a
//! multiple of the entry size, lengths above a cap (checked before allocating) and short
//! reads are [`Error`] values; nothing panics on peer data. A fuzz target lives in
//! `fuzz/`.
// The one exception is the `recvmsg` that receives a MemoryFd's fds ([`fd`]): no safe
// wrapper in our dependencies sets MSG_CMSG_CLOEXEC and hands back every fd owned.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod error;
pub mod fd;
pub mod framing;
pub mod memory;
pub mod page_fault;
pub mod protocol;
pub mod receiver;
pub mod request;
pub mod role;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;

pub use error::{Error, Result};
pub use fd::{recv_memory_fd, recv_memory_fd_payload, send_memory_fd};
pub use framing::{
    expect_ok, read_payload, read_request_header, read_request_header_or_eof, read_response,
    send_request, send_response,
};
pub use memory::{
    DEFAULT_MAX_RANGE_TABLE_BYTES, MEMORY_CHUNK_SIZE, MEMORY_RANGE_SIZE, MemoryRange,
    MemoryRangeTable,
};
pub use page_fault::{FaultRequest, MAX_PAGE_FAULT_LENGTH, PageDelivery};
pub use protocol::{
    CURRENT_PROTOCOL_VERSION, Command, HEADER_SIZE, RequestHeader, ResponseHeader, Status,
    check_version, supported_versions,
};
pub use receiver::ReceiverPhase;
pub use request::{DEFAULT_MAX_JSON_PAYLOAD, Limits, Request, read_request, send_memory_table};
pub use role::{ConnectionRole, read_role, write_role};
