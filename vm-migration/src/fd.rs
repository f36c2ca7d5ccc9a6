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
//! # Hostile peers
//!
//! The payload is received with our own `recvmsg` call: a fixed control buffer with room
//! for [`MAX_FDS_PER_MESSAGE`] fds, `MSG_CMSG_CLOEXEC` (so no received fd is ever
//! inheritable, not even for an instant), and every fd that arrived owned at once. A message
//! with more than one fd, or whose control data was truncated (`MSG_CTRUNC`: even more fds,
//! which the kernel drops), is refused with [`Error::TooManyFds`] after closing every fd
//! that did arrive, so a peer cannot leave fds open in this process.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{Error, Result};
use crate::framing::{read_request_header, write_message};
use crate::protocol::{Command, MEMORY_FD_PAYLOAD_SIZE, RequestHeader};

/// Size of the slot id payload.
const SLOT_SIZE: usize = MEMORY_FD_PAYLOAD_SIZE as usize;

/// The most fds one `MemoryFd` payload may arrive with and still be closed by us; the kernel
/// drops any beyond (reporting `MSG_CTRUNC`). Exactly one is valid.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

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
/// A payload with more than one fd is refused after closing all of them.
pub fn recv_memory_fd_payload(sock: &UnixStream) -> Result<(u32, File)> {
    let mut buf = [0u8; SLOT_SIZE];
    let mut got = 0;
    let mut file: Option<File> = None;
    // Normally one recvmsg returns all 4 bytes and the fd. Keep using recvmsg (never a
    // plain read) for any remainder so a fd attached to later bytes is not lost either.
    while got < SLOT_SIZE {
        let received = recv_with_fds(sock, &mut buf[got..]).map_err(|e| Error::Io {
            op: "receiving a MemoryFd slot id and fd",
            source: e,
        })?;
        if received.truncated || received.fds.len() + usize::from(file.is_some()) > 1 {
            // Dropping `received` closes every fd that came.
            return Err(Error::TooManyFds);
        }
        if let Some(fd) = received.fds.into_iter().next() {
            file = Some(File::from(fd));
        }
        let n = received.bytes;
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
    Ok((slot, file))
}

/// What one `recvmsg` brought.
struct Received {
    bytes: usize,
    /// Every fd that arrived, owned (close-on-exec).
    fds: Vec<OwnedFd>,
    /// The control data did not fit: more fds were sent than the buffer holds.
    truncated: bool,
}

/// Room for the control message of [`MAX_FDS_PER_MESSAGE`] fds: `CMSG_SPACE(16 * 4)` is 80
/// bytes on 64-bit Linux; u64 elements give the alignment `cmsghdr` needs.
type CmsgBuffer = [u64; 16];

/// One `recvmsg` into `buf` with `MSG_CMSG_CLOEXEC` and a fixed control buffer; every fd
/// in the control data is returned owned, so none can leak.
#[allow(unsafe_code)]
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut control: CmsgBuffer = [0; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid "no name, no iovec, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<CmsgBuffer>() as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (covering `buf`, borrowed mutably for this call)
        // and at `control`, both alive for the call and of the lengths given; the kernel
        // writes at most those lengths. The return value is checked.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by a successful recvmsg: msg_control/msg_controllen
    // describe the control data the kernel wrote into `control`, which the CMSG macros walk
    // without leaving it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return either null or a header inside
        // `control` that the kernel wrote.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) has no preconditions.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the data of this header lies inside `control` (the kernel clips
            // cmsg_len to what it wrote).
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                // SAFETY: fd `i` lies inside the header's data (checked by the bound).
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i)) };
                // SAFETY: SCM_RIGHTS installed this fd in our table for us alone; owning it
                // at once means it is closed on every path.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is a header inside `control`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        bytes: n,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
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

    /// How many fds of this process refer to the same file as `f` (by its /proc link), so
    /// a refused fd still open shows up however many fds other tests open meanwhile.
    fn fds_to(f: &File) -> usize {
        let link = |p: std::path::PathBuf| std::fs::read_link(p).ok();
        let target = link(format!("/proc/self/fd/{}", f.as_raw_fd()).into()).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| link(e.ok()?.path()))
            .filter(|t| *t == target)
            .count()
    }

    /// Two fds, or so many that the control data is truncated: refused, and every fd that
    /// arrived is closed again.
    #[test]
    fn extra_fds_are_refused_and_closed() {
        let files: Vec<File> = (0..40u8).map(|i| temp_with(&[i])).collect();
        let raw: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        for count in [2, 3, MAX_FDS_PER_MESSAGE, MAX_FDS_PER_MESSAGE + 1, 40] {
            let (a, b) = UnixStream::pair().unwrap();
            (&a).write_all(&RequestHeader::memory_fd().to_bytes())
                .unwrap();
            a.send_with_fds(&[&5u32.to_le_bytes()[..]], &raw[..count])
                .unwrap();
            let e = recv_memory_fd(&b).unwrap_err();
            assert!(matches!(e, Error::TooManyFds), "{count}: {e}");
            for f in &files[..count] {
                assert_eq!(fds_to(f), 1, "{count} fds sent: a received one stayed open");
            }
        }
    }

    #[test]
    fn received_fd_is_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = temp_with(b"x");
        send_memory_fd(&a, 1, &f).unwrap();
        let (_, got) = recv_memory_fd(&b).unwrap();
        let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", got.as_raw_fd()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("flags:").map(|v| v.trim().to_string()))
            .unwrap();
        let flags = u32::from_str_radix(&flags, 8).unwrap();
        assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "flags {flags:o}");
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
