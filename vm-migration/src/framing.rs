//! Sending and receiving headers and payloads over any `Read`/`Write` (spec §1.5).
//!
//! The protocol is lock-step: write one request (header + payload), then read exactly one
//! response. Every length that comes from the peer is checked against a caller-given cap
//! before memory is committed to it, and an early end of stream is reported as
//! [`Error::ConnectionClosed`] (nothing of the message arrived) or [`Error::Truncated`]
//! (part of it did).

use std::io::{ErrorKind, Read, Write};

use crate::error::{Error, Result};
use crate::protocol::{Command, HEADER_SIZE, RequestHeader, ResponseHeader, Status};

/// Payloads up to this size are written together with their header in one `write`.
/// Two small writes in a row can stall ~40 ms on a TCP socket with Nagle enabled while the
/// peer delays its ACK, which would hurt the one-page-per-round-trip PageFault traffic.
const COALESCE_LIMIT: usize = 4096;

/// `read_payload` never pre-allocates more than this; larger payloads grow as bytes
/// actually arrive, so a peer announcing a huge length cannot make us commit memory it
/// does not send.
const PREALLOC_LIMIT: usize = 1 << 20;

/// Fills `buf` completely, distinguishing "closed before the first byte" from "closed in
/// the middle", and retrying on `Interrupted`.
pub(crate) fn read_exact_or_closed<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(Error::ConnectionClosed { what }),
            Ok(0) => {
                return Err(Error::Truncated {
                    what,
                    got: got as u64,
                    expected: buf.len() as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Read { what, source: e }),
        }
    }
    Ok(())
}

/// Writes a 16-byte header and its payload, then flushes.
pub(crate) fn write_message<W: Write>(
    w: &mut W,
    header: &[u8; HEADER_SIZE],
    payload: &[u8],
    op: &'static str,
) -> Result<()> {
    let res = if payload.len() <= COALESCE_LIMIT {
        let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
        buf.extend_from_slice(header);
        buf.extend_from_slice(payload);
        w.write_all(&buf)
    } else {
        w.write_all(header).and_then(|()| w.write_all(payload))
    };
    // Flush: the peer must see the whole message before we block on its answer.
    res.and_then(|()| w.flush()).map_err(Error::io(op))
}

/// Sends a request. `payload.len()` must equal `header.length()`, except for `Memory`,
/// where `payload` is the range table and the page data is written by the caller
/// afterwards. `MemoryFd` is refused: use [`crate::fd::send_memory_fd`].
pub fn send_request<W: Write>(w: &mut W, header: &RequestHeader, payload: &[u8]) -> Result<()> {
    if header.command() == Command::MemoryFd {
        return Err(Error::MemoryFdNeedsSocket);
    }
    if payload.len() as u64 != header.length() {
        return Err(Error::PayloadLength {
            command: header.command(),
            got: payload.len() as u64,
            expected: header.length(),
        });
    }
    write_message(w, &header.to_bytes(), payload, "writing a request")
}

/// Reads one request header (exactly 16 bytes, never more: see [`crate::fd`] for why
/// that matters before a `MemoryFd` payload).
pub fn read_request_header<R: Read>(r: &mut R) -> Result<RequestHeader> {
    let mut b = [0u8; HEADER_SIZE];
    read_exact_or_closed(r, &mut b, "a request header")?;
    RequestHeader::from_bytes(&b)
}

/// Like [`read_request_header`], but a connection closed cleanly before the header is
/// `Ok(None)`: the normal end of a PrecopyMemory or fault connection.
pub fn read_request_header_or_eof<R: Read>(r: &mut R) -> Result<Option<RequestHeader>> {
    match read_request_header(r) {
        Ok(h) => Ok(Some(h)),
        Err(e) if e.is_closed_between_messages() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a payload of `len` bytes announced by the peer. `len > cap` is an error before
/// anything is allocated; fewer than `len` bytes before end of stream is an error.
pub fn read_payload<R: Read>(r: &mut R, len: u64, cap: u64) -> Result<Vec<u8>> {
    let too_large = Error::TooLarge {
        what: "payload",
        length: len,
        limit: cap,
    };
    if len > cap {
        return Err(too_large);
    }
    let want = usize::try_from(len).map_err(|_| too_large)?;
    let mut buf = Vec::with_capacity(want.min(PREALLOC_LIMIT));
    // `take` bounds the read to `len` bytes, so we never consume the next message.
    r.by_ref()
        .take(len)
        .read_to_end(&mut buf)
        .map_err(Error::io("reading a payload"))?;
    if buf.is_empty() && want > 0 {
        return Err(Error::ConnectionClosed { what: "a payload" });
    }
    if buf.len() < want {
        return Err(Error::Truncated {
            what: "a payload",
            got: buf.len() as u64,
            expected: len,
        });
    }
    Ok(buf)
}

/// Sends a response with `status` and `payload` (empty for every response except an
/// inline `PageFault` answer).
pub fn send_response<W: Write>(w: &mut W, status: Status, payload: &[u8]) -> Result<()> {
    let header = ResponseHeader {
        status,
        length: payload.len() as u64,
    };
    write_message(w, &header.to_bytes(), payload, "writing a response")
}

/// Reads one response header.
pub fn read_response<R: Read>(r: &mut R) -> Result<ResponseHeader> {
    let mut b = [0u8; HEADER_SIZE];
    read_exact_or_closed(r, &mut b, "a response header")?;
    ResponseHeader::from_bytes(&b)
}

/// Reads a response and requires a bare `Ok` (status Ok, length 0), the answer to every
/// command except `PageFault`. `Error` and `Invalid` become [`Error::NotOk`].
pub fn expect_ok<R: Read>(r: &mut R) -> Result<()> {
    let h = read_response(r)?;
    if h.status != Status::Ok {
        return Err(Error::NotOk(h.status));
    }
    if h.length != 0 {
        return Err(Error::UnexpectedResponsePayload(h.length));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{self, Cursor};

    use super::*;

    #[test]
    fn request_round_trip() {
        let mut wire = Vec::new();
        send_request(&mut wire, &RequestHeader::config(5), b"{\"a\"}").unwrap();
        assert_eq!(wire.len(), 21);
        let mut r = Cursor::new(wire);
        let h = read_request_header(&mut r).unwrap();
        assert_eq!(h, RequestHeader::config(5));
        assert_eq!(read_payload(&mut r, h.length(), 100).unwrap(), b"{\"a\"}");
        assert!(read_request_header_or_eof(&mut r).unwrap().is_none());
    }

    #[test]
    fn large_payload_round_trip() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        let h = RequestHeader::state(payload.len() as u64);
        send_request(&mut wire, &h, &payload).unwrap();
        let mut r = Cursor::new(wire);
        let got = read_request_header(&mut r).unwrap();
        assert_eq!(
            read_payload(&mut r, got.length(), 1 << 20).unwrap(),
            payload
        );
    }

    #[test]
    fn send_request_checks_its_arguments() {
        let mut wire = Vec::new();
        assert!(matches!(
            send_request(&mut wire, &RequestHeader::config(4), b"abc"),
            Err(Error::PayloadLength {
                got: 3,
                expected: 4,
                ..
            })
        ));
        assert!(matches!(
            send_request(&mut wire, &RequestHeader::memory_fd(), &[3, 0, 0, 0]),
            Err(Error::MemoryFdNeedsSocket)
        ));
        assert!(wire.is_empty());
    }

    #[test]
    fn truncated_headers_at_every_position() {
        let req = RequestHeader::state(7).to_bytes();
        let resp = ResponseHeader::ok().to_bytes();
        for cut in 0..HEADER_SIZE {
            let e = read_request_header(&mut Cursor::new(req[..cut].to_vec())).unwrap_err();
            let e2 = read_response(&mut Cursor::new(resp[..cut].to_vec())).unwrap_err();
            for e in [e, e2] {
                if cut == 0 {
                    assert!(matches!(e, Error::ConnectionClosed { .. }), "{e}");
                } else {
                    assert!(
                        matches!(e, Error::Truncated { got, expected: 16, .. } if got == cut as u64),
                        "{e}"
                    );
                }
            }
        }
        let e = read_request_header(&mut Cursor::new(Vec::new())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "connection closed by peer while reading a request header"
        );
        // A header cut mid-way is an error even for the EOF-tolerant variant.
        assert!(read_request_header_or_eof(&mut Cursor::new(req[..5].to_vec())).is_err());
    }

    #[test]
    fn payload_caps_and_truncation() {
        let e = read_payload(&mut Cursor::new(Vec::new()), i64::MAX as u64, 64 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "payload of 9223372036854775807 bytes exceeds the 64 MiB limit"
        );
        // A huge but allowed length with few bytes behind it: no huge allocation, an error.
        let e = read_payload(&mut Cursor::new(vec![1, 2, 3]), u64::MAX, u64::MAX).unwrap_err();
        assert!(matches!(e, Error::Truncated { got: 3, .. }), "{e}");
        let e = read_payload(&mut Cursor::new(Vec::new()), 10, 10).unwrap_err();
        assert!(matches!(e, Error::ConnectionClosed { .. }), "{e}");
        for cut in 1..10 {
            let e = read_payload(&mut Cursor::new(vec![0; cut]), 10, 10).unwrap_err();
            assert!(matches!(e, Error::Truncated { got, expected: 10, .. } if got == cut as u64));
        }
        assert!(
            read_payload(&mut Cursor::new(Vec::new()), 0, 0)
                .unwrap()
                .is_empty()
        );
        // Only `len` bytes are consumed.
        let mut r = Cursor::new(vec![1, 2, 3, 4]);
        assert_eq!(read_payload(&mut r, 2, 2).unwrap(), [1, 2]);
        assert_eq!(r.position(), 2);
    }

    #[test]
    fn expect_ok_variants() {
        let mut wire = Vec::new();
        send_response(&mut wire, Status::Ok, &[]).unwrap();
        expect_ok(&mut Cursor::new(wire)).unwrap();

        for status in [Status::Error, Status::Invalid] {
            let mut wire = Vec::new();
            send_response(&mut wire, status, &[]).unwrap();
            let e = expect_ok(&mut Cursor::new(wire)).unwrap_err();
            assert!(matches!(e, Error::NotOk(s) if s == status), "{e}");
        }

        let mut wire = Vec::new();
        send_response(&mut wire, Status::Ok, &[0; 8]).unwrap();
        assert!(matches!(
            expect_ok(&mut Cursor::new(wire)),
            Err(Error::UnexpectedResponsePayload(8))
        ));

        let mut b = ResponseHeader::ok().to_bytes();
        b[0] = 7;
        assert!(matches!(
            expect_ok(&mut Cursor::new(b.to_vec())),
            Err(Error::UnknownStatus(7))
        ));
    }

    /// A reader that returns one byte at a time and sometimes `Interrupted`.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        calls: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::Error::from(ErrorKind::Interrupted));
            }
            if self.pos == self.data.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.data[self.pos];
            self.pos += 1;
            Ok(1)
        }
    }

    #[test]
    fn short_reads_and_interrupts_are_retried() {
        let mut data = RequestHeader::config(3).to_bytes().to_vec();
        data.extend_from_slice(b"xyz");
        let mut r = Trickle {
            data,
            pos: 0,
            calls: 0,
        };
        let h = read_request_header(&mut r).unwrap();
        assert_eq!(read_payload(&mut r, h.length(), 3).unwrap(), b"xyz");
    }

    #[test]
    fn io_errors_name_the_step() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from(ErrorKind::ConnectionReset))
            }
        }
        let e = read_response(&mut Broken).unwrap_err();
        assert!(e.to_string().contains("a response header"), "{e}");
    }
}
