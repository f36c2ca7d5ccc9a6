//! `MemoryFd`: handing a guest-RAM memfd to the peer over a UNIX socket (spec §2.2).
//!
//! On the wire: the 16-byte header (command 7, length 4) written with a plain `write`, then
//! one `sendmsg` whose data is the slot id (u32 LE) and whose `SCM_RIGHTS` control message
//! carries exactly one fd. The peer answers with a bare `Ok` (read it with
//! [`crate::framing::expect_ok`]).
//!
//! # Why the receiver must not read ahead
//!
//! On Linux the fd travels attached to the socket buffer that holds the 4 payload bytes. A
//! `read` that reaches into those bytes without room for control data makes the kernel
//! drop (close) the fd. So the receiver reads the header with plain reads of *exactly*
//! 16 bytes (never through a `BufReader`, never with a larger buffer) and then takes the 4
//! payload bytes with `recvmsg`. [`recv_memory_fd`] does both; if you read headers
//! yourself, read them from the raw `UnixStream` with
//! [`crate::framing::read_request_header`] and call [`recv_memory_fd_payload`].
//!
//! # Known limitation: a second fd can go unnoticed
//!
//! vmm-sys-util's safe `recv_with_fd` sizes the control buffer with `CMSG_SPACE(4)`,
//! which on 64-bit Linux has room for two fds, then reports only the first. A peer that
//! attaches exactly two fds therefore gets the first accepted and the second left open in
//! this process (three or more are refused with [`Error::TooManyFds`]). CH never does this;
//! a hostile peer can leak one fd per `MemoryFd`, so receivers should bound how many
//! `MemoryFd` requests they accept (one per RAM slot). Fixing it without `unsafe` needs a
//! fix in vmm-sys-util (or a crate with a safe `recvmsg` returning `OwnedFd`s, e.g. rustix).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{Error, Result};
use crate::framing::{read_request_header, write_message};
use crate::protocol::{Command, MEMORY_FD_PAYLOAD_SIZE, RequestHeader};

/// Size of the slot id payload.
const SLOT_SIZE: usize = MEMORY_FD_PAYLOAD_SIZE as usize;

/// The errno vmm-sys-util returns when control data was truncated or held more fds than
/// asked for (it closes them all). 105 is the asm-generic value shared by x86_64, aarch64
/// and riscv64; `recv_rejects_extra_fds` checks it on the build host.
const ENOBUFS: i32 = 105;

/// Sends `MemoryFd` for `slot` with `fd` attached. Does not wait for the response.
///
/// `fd` is typically a memfd whose bytes `[file_offset, file_offset + size)` back the
/// slot's guest RAM as described by the Config's `guest_ram_mappings`.
pub fn send_memory_fd<F: AsFd>(sock: &UnixStream, slot: u32, fd: F) -> Result<()> {
    let mut writer = sock;
    write_message(
        &mut writer,
        &RequestHeader::memory_fd().to_bytes(),
        &[],
        "writing a MemoryFd header",
    )?;
    let payload = slot.to_le_bytes();
    let sent = sock
        .send_with_fd(&payload[..], fd.as_fd().as_raw_fd())
        .map_err(|e| Error::Io {
            op: "sending a MemoryFd slot id and fd",
            source: e.into(),
        })?;
    if sent == 0 {
        return Err(Error::Io {
            op: "sending a MemoryFd slot id and fd",
            source: std::io::ErrorKind::WriteZero.into(),
        });
    }
    // A stream socket may accept fewer bytes; the fd went with the first of them, so the
    // rest can follow as plain data.
    writer
        .write_all(&payload[sent.min(SLOT_SIZE)..])
        .map_err(Error::io("sending a MemoryFd slot id"))
}

/// Reads a request header from `sock`, requires it to be `MemoryFd` with length 4, then
/// receives the slot id and fd. Returns `(slot, fd)`.
pub fn recv_memory_fd(sock: &UnixStream) -> Result<(u32, File)> {
    let mut reader = sock;
    let header = read_request_header(&mut reader)?;
    if header.command() != Command::MemoryFd {
        return Err(Error::UnexpectedCommand {
            command: header.command(),
            expected: "MemoryFd",
        });
    }
    // CH's receiver ignores this length, but every sender writes 4; anything else means
    // the two sides disagree about where the next message starts.
    if header.length() != MEMORY_FD_PAYLOAD_SIZE {
        return Err(Error::PayloadLength {
            command: Command::MemoryFd,
            got: header.length(),
            expected: MEMORY_FD_PAYLOAD_SIZE,
        });
    }
    recv_memory_fd_payload(sock)
}

/// Receives the payload of a `MemoryFd` whose 16-byte header was already read (exactly,
/// without read-ahead): the slot id and exactly one fd. The returned file is close-on-exec.
pub fn recv_memory_fd_payload(sock: &UnixStream) -> Result<(u32, File)> {
    let mut buf = [0u8; SLOT_SIZE];
    let mut got = 0;
    let mut file: Option<File> = None;
    // Normally one recvmsg returns all 4 bytes and the fd. Keep using recvmsg (never a
    // plain read) for any remainder so a fd attached to later bytes is not lost either.
    while got < SLOT_SIZE {
        let (n, received) = sock.recv_with_fd(&mut buf[got..]).map_err(|e| {
            if e.errno() == ENOBUFS {
                Error::TooManyFds
            } else {
                Error::Io {
                    op: "receiving a MemoryFd slot id and fd",
                    source: e.into(),
                }
            }
        })?;
        if let Some(f) = received {
            if file.is_some() {
                return Err(Error::TooManyFds);
            }
            file = Some(f);
        }
        if n == 0 {
            return Err(if got == 0 {
                Error::ConnectionClosed {
                    what: "a MemoryFd slot id",
                }
            } else {
                Error::Truncated {
                    what: "a MemoryFd slot id",
                    got: got as u64,
                    expected: SLOT_SIZE as u64,
                }
            });
        }
        got += n;
    }
    let slot = u32::from_le_bytes(buf);
    let file = file.ok_or(Error::NoFdReceived(slot))?;
    // recvmsg ran without MSG_CMSG_CLOEXEC (vmm-sys-util does not pass it), so the fd
    // would leak into any child we exec. try_clone() dups with F_DUPFD_CLOEXEC; dropping
    // the original closes the inheritable copy.
    let cloexec = file
        .try_clone()
        .map_err(Error::io("duplicating a received memory fd"))?;
    Ok((slot, cloexec))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::framing::{expect_ok, send_request, send_response};
    use crate::protocol::Status;

    fn temp_with(contents: &[u8]) -> File {
        let mut f = TempFile::new().unwrap().into_file();
        f.write_all(contents).unwrap();
        f
    }

    #[test]
    fn spec_bytes_on_the_wire() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let f = temp_with(b"x");
        send_memory_fd(&a, 3, &f).unwrap();
        drop(a);
        // Reading plainly here deliberately discards the fd: we only look at the bytes.
        let mut bytes = Vec::new();
        b.read_to_end(&mut bytes).unwrap();
        assert_eq!(
            bytes,
            [7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0]
        );
    }

    #[test]
    fn fd_passing_and_no_bytes_swallowed() {
        let (a, b) = UnixStream::pair().unwrap();
        let original = temp_with(b"guest ram contents");

        // Sender: MemoryFd, then immediately the next request, before the receiver reads
        // anything, so both sit in the socket buffer together.
        send_memory_fd(&a, 3, &original).unwrap();
        send_request(&mut &a, &RequestHeader::config(2), b"{}").unwrap();

        let (slot, received) = recv_memory_fd(&b).unwrap();
        assert_eq!(slot, 3);
        let mut buf = [0u8; 18];
        received.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"guest ram contents");
        // Same file, not a copy: a write through the received fd shows in the original.
        received.write_all_at(b"GUEST", 0).unwrap();
        let mut check = [0u8; 5];
        original.read_exact_at(&mut check, 0).unwrap();
        assert_eq!(&check, b"GUEST");

        // The following request is intact.
        send_response(&mut &b, Status::Ok, &[]).unwrap();
        expect_ok(&mut &a).unwrap();
        let h = read_request_header(&mut &b).unwrap();
        assert_eq!(h, RequestHeader::config(2));
        assert_eq!(
            crate::framing::read_payload(&mut &b, h.length(), 16).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn several_fds_in_a_row() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..4u8).map(|i| temp_with(&[i; 4])).collect();
        for (slot, f) in files.iter().enumerate() {
            send_memory_fd(&a, slot as u32 * 10, f).unwrap();
        }
        for i in 0..4u8 {
            let (slot, mut f) = recv_memory_fd(&b).unwrap();
            assert_eq!(slot, u32::from(i) * 10);
            f.seek(SeekFrom::Start(0)).unwrap();
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).unwrap();
            assert_eq!(buf, [i; 4]);
        }
    }

    #[test]
    fn payload_without_fd_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        (&a).write_all(&9u32.to_le_bytes()).unwrap();
        assert!(matches!(recv_memory_fd(&b), Err(Error::NoFdReceived(9))));
    }

    #[test]
    fn recv_rejects_extra_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<File> = (0..3u8).map(|i| temp_with(&[i])).collect();
        let raw: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        (&a).write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        a.send_with_fds(&[&5u32.to_le_bytes()[..]], &raw).unwrap();
        let e = recv_memory_fd(&b).unwrap_err();
        assert!(matches!(e, Error::TooManyFds), "{e}");
    }

    /// Documents a vmm-sys-util limitation (see the module docs): with exactly two fds the
    /// first is returned and the second stays open, invisible to us. If this test starts
    /// failing, vmm-sys-util got fixed: make two fds an error here too.
    #[test]
    fn two_fds_limitation_of_vmm_sys_util() {
        let (a, b) = UnixStream::pair().unwrap();
        let (f1, f2) = (temp_with(b"1"), temp_with(b"2"));
        (&a).write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        a.send_with_fds(
            &[&5u32.to_le_bytes()[..]],
            &[f1.as_raw_fd(), f2.as_raw_fd()],
        )
        .unwrap();
        let (slot, f) = recv_memory_fd(&b).unwrap();
        assert_eq!(slot, 5);
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(&byte, b"1");
    }

    #[test]
    fn wrong_header_or_closed_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        send_request(&mut &a, &RequestHeader::complete(), &[]).unwrap();
        assert!(matches!(
            recv_memory_fd(&b),
            Err(Error::UnexpectedCommand {
                command: Command::Complete,
                ..
            })
        ));

        let (a, b) = UnixStream::pair().unwrap();
        let mut h = RequestHeader::memory_fd().to_bytes();
        h[8] = 8;
        (&a).write_all(&h).unwrap();
        assert!(matches!(
            recv_memory_fd(&b),
            Err(Error::PayloadLength { got: 8, .. })
        ));

        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        (&a).write_all(&[1, 2]).unwrap();
        drop(a);
        assert!(matches!(
            recv_memory_fd(&b),
            Err(Error::Truncated { got: 2, .. })
        ));

        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&RequestHeader::memory_fd().to_bytes())
            .unwrap();
        drop(a);
        assert!(matches!(
            recv_memory_fd(&b),
            Err(Error::ConnectionClosed { .. })
        ));
    }
}
