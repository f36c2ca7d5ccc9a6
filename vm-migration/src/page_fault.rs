//! `PageFault` traffic on the fault connection (spec §2.8, §3.3).
//!
//! Direction is reversed compared with the main connection: the *destination* (which
//! accepted the connection) sends `PageFault{gpa, length}` and the *source* answers with
//! either
//! * `Ok, length 0`: "I wrote the page into the shared memfd I gave you with `MemoryFd`"
//!   (destination resolves with `UFFDIO_CONTINUE`), or
//! * `Ok, length = page size` followed by the page bytes (destination resolves with
//!   `UFFDIO_COPY`).
//!
//! Which one is correct is not negotiated: it follows from whether the destination received
//! memory fds, and the requester treats the other form as fatal. Requests are strictly
//! one at a time.

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::framing::{read_exact_or_closed, read_request_header_or_eof, write_message};
use crate::memory::{MEMORY_RANGE_SIZE, MemoryRange};
use crate::protocol::{Command, RequestHeader, ResponseHeader, Status};

/// Largest page a Cloud Hypervisor source serves (1 GiB, the largest hugepage); it also
/// rejects length 0.
pub const MAX_PAGE_FAULT_LENGTH: u64 = 1 << 30;

/// How the destination expects page contents to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageDelivery {
    /// The destination received memory fds: the source writes the page into the shared
    /// memfd and answers with length 0.
    SharedMemfd,
    /// No memory fds: the page bytes follow the response header.
    Inline,
}

/// A request a fault-connection server can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultRequest {
    /// Serve this page.
    PageFault(MemoryRange),
    /// The destination gives up: answer `Ok` and stop serving.
    Abandon,
    /// Our extension: every page is in place on the destination, which takes over the
    /// VM for good. Answer `Ok`; the source may now discard its copy. Sent only to a
    /// source that announced it in its state (a Cloud Hypervisor source would fail on
    /// it), so a source that expects it can tell a finished transfer from a destination
    /// that died (both end in EOF otherwise).
    Complete,
}

/// Destination side: sends one `PageFault` request.
pub fn send_page_fault<W: Write>(w: &mut W, range: MemoryRange) -> Result<()> {
    write_message(
        w,
        &RequestHeader::page_fault().to_bytes(),
        &range.to_bytes(),
        "writing a PageFault request",
    )
}

/// Validates the header and 16-byte body of a `PageFault` request: the header must be
/// `PageFault` with length 16, the range must not overflow and its length must be in
/// `1..=max_len` ([`MAX_PAGE_FAULT_LENGTH`] is CH's bound).
pub fn decode_page_fault(
    header: &RequestHeader,
    body: &[u8; MEMORY_RANGE_SIZE],
    max_len: u64,
) -> Result<MemoryRange> {
    check_page_fault_header(header)?;
    let range = MemoryRange::from_bytes(body)?;
    if range.length == 0 || range.length > max_len {
        return Err(Error::PageFaultLength {
            gpa: range.gpa,
            length: range.length,
            max: max_len,
        });
    }
    Ok(range)
}

pub(crate) fn check_page_fault_header(header: &RequestHeader) -> Result<()> {
    if header.command() != Command::PageFault {
        return Err(Error::UnexpectedCommand {
            command: header.command(),
            expected: "PageFault",
        });
    }
    if header.length() != MEMORY_RANGE_SIZE as u64 {
        return Err(Error::PayloadLength {
            command: Command::PageFault,
            got: header.length(),
            expected: MEMORY_RANGE_SIZE as u64,
        });
    }
    Ok(())
}

/// Source side: reads the body of a `PageFault` whose header was already read.
pub fn read_page_fault_body<R: Read>(
    r: &mut R,
    header: &RequestHeader,
    max_len: u64,
) -> Result<MemoryRange> {
    // Check the header before reading so a wrong length never desynchronizes the stream.
    check_page_fault_header(header)?;
    let mut body = [0u8; MEMORY_RANGE_SIZE];
    read_exact_or_closed(r, &mut body, "a PageFault range")?;
    decode_page_fault(header, &body, max_len)
}

/// Source side: reads the next request of the fault connection. `Ok(None)` means the
/// destination closed the connection between requests: every page is in place (the
/// normal end of a postcopy or on-demand restore).
pub fn read_fault_request<R: Read>(r: &mut R, max_len: u64) -> Result<Option<FaultRequest>> {
    let Some(header) = read_request_header_or_eof(r)? else {
        return Ok(None);
    };
    match header.command() {
        Command::PageFault => Ok(Some(FaultRequest::PageFault(read_page_fault_body(
            r, &header, max_len,
        )?))),
        Command::Abandon if header.length() == 0 => Ok(Some(FaultRequest::Abandon)),
        Command::Complete if header.length() == 0 => Ok(Some(FaultRequest::Complete)),
        command @ (Command::Abandon | Command::Complete) => Err(Error::PayloadLength {
            command,
            got: header.length(),
            expected: 0,
        }),
        command => Err(Error::UnexpectedCommand {
            command,
            expected: "PageFault or Abandon on a fault connection",
        }),
    }
}

/// Destination side: tells a source that asked for it that every page is in place
/// ([`FaultRequest::Complete`]) and waits for its `Ok`.
pub fn send_fault_complete<S: Read + Write>(s: &mut S) -> Result<()> {
    write_message(
        s,
        &RequestHeader::complete().to_bytes(),
        &[],
        "writing Complete on the fault connection",
    )?;
    crate::framing::expect_ok(s)
}

/// Source side, shared memfd: the page has been written into the memfd; answers
/// `Ok, length 0`.
pub fn send_page_written_to_memfd<W: Write>(w: &mut W) -> Result<()> {
    write_message(
        w,
        &ResponseHeader::ok().to_bytes(),
        &[],
        "writing a PageFault response",
    )
}

/// Source side, inline: answers `Ok, length = page.len()` followed by the page bytes.
pub fn send_page_inline<W: Write>(w: &mut W, page: &[u8]) -> Result<()> {
    let header = ResponseHeader {
        status: Status::Ok,
        length: page.len() as u64,
    };
    write_message(w, &header.to_bytes(), page, "writing a PageFault response")
}

/// Destination side: reads the answer to the `PageFault` for a page of `page.len()` bytes.
///
/// With [`PageDelivery::Inline`] the page bytes are read into `page` and the response
/// length must equal `page.len()`; with [`PageDelivery::SharedMemfd`] the length must be 0
/// and `page` is left untouched. A status other than `Ok` is [`Error::NotOk`].
pub fn read_page_fault_response<R: Read>(
    r: &mut R,
    delivery: PageDelivery,
    page: &mut [u8],
) -> Result<()> {
    let header = crate::framing::read_response(r)?;
    if header.status != Status::Ok {
        return Err(Error::NotOk(header.status));
    }
    let (expected, mode) = match delivery {
        PageDelivery::SharedMemfd => (0, "memory fds were exchanged, page goes in the memfd"),
        PageDelivery::Inline => (page.len() as u64, "no memory fds, page comes inline"),
    };
    if header.length != expected {
        return Err(Error::PageFaultResponseLength {
            got: header.length,
            expected,
            mode,
        });
    }
    if delivery == PageDelivery::Inline {
        read_exact_or_closed(r, page, "PageFault page data")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn spec_request_bytes() -> Vec<u8> {
        let mut b = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&[0x00, 0x40, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x00, 0x10, 0, 0, 0, 0, 0, 0]);
        b
    }

    #[test]
    fn spec_request() {
        let mut wire = Vec::new();
        send_page_fault(&mut wire, MemoryRange::new(0x4000, 0x1000)).unwrap();
        assert_eq!(wire, spec_request_bytes());
        let got = read_fault_request(&mut Cursor::new(wire), MAX_PAGE_FAULT_LENGTH).unwrap();
        assert_eq!(
            got,
            Some(FaultRequest::PageFault(MemoryRange::new(0x4000, 0x1000)))
        );
    }

    #[test]
    fn spec_inline_answer() {
        let page: Vec<u8> = (0..0x1000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        send_page_inline(&mut wire, &page).unwrap();
        assert_eq!(
            &wire[..16],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(wire.len(), 16 + 0x1000);
        let mut got = vec![0u8; 0x1000];
        read_page_fault_response(&mut Cursor::new(wire), PageDelivery::Inline, &mut got).unwrap();
        assert_eq!(got, page);
    }

    #[test]
    fn spec_memfd_answer_is_plain_ok() {
        let mut wire = Vec::new();
        send_page_written_to_memfd(&mut wire).unwrap();
        assert_eq!(wire, ResponseHeader::ok().to_bytes());
        let mut page = [0xaa; 8];
        read_page_fault_response(&mut Cursor::new(wire), PageDelivery::SharedMemfd, &mut page)
            .unwrap();
        assert_eq!(page, [0xaa; 8]);
    }

    #[test]
    fn wrong_answer_form_is_fatal() {
        let mut inline = Vec::new();
        send_page_inline(&mut inline, &[0; 4096]).unwrap();
        let e = read_page_fault_response(
            &mut Cursor::new(inline),
            PageDelivery::SharedMemfd,
            &mut [0; 4096],
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::PageFaultResponseLength {
                    got: 4096,
                    expected: 0,
                    ..
                }
            ),
            "{e}"
        );

        let mut bare = Vec::new();
        send_page_written_to_memfd(&mut bare).unwrap();
        let e =
            read_page_fault_response(&mut Cursor::new(bare), PageDelivery::Inline, &mut [0; 4096])
                .unwrap_err();
        assert!(matches!(
            e,
            Error::PageFaultResponseLength {
                got: 0,
                expected: 4096,
                ..
            }
        ));

        let mut err = Vec::new();
        crate::framing::send_response(&mut err, Status::Error, &[]).unwrap();
        let e = read_page_fault_response(&mut Cursor::new(err), PageDelivery::Inline, &mut [0; 1])
            .unwrap_err();
        assert!(matches!(e, Error::NotOk(Status::Error)));

        // Inline answer cut short.
        let mut short = Vec::new();
        send_page_inline(&mut short, &[1; 4096]).unwrap();
        short.truncate(16 + 100);
        let e = read_page_fault_response(
            &mut Cursor::new(short),
            PageDelivery::Inline,
            &mut [0; 4096],
        )
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Truncated {
                got: 100,
                expected: 4096,
                ..
            }
        ));
    }

    #[test]
    fn bad_requests() {
        let h = RequestHeader::page_fault();
        for (range, ok) in [
            (MemoryRange::new(0x4000, 0), false),
            (MemoryRange::new(0x4000, MAX_PAGE_FAULT_LENGTH + 1), false),
            (MemoryRange::new(0x4000, MAX_PAGE_FAULT_LENGTH), true),
            (MemoryRange::new(u64::MAX, 1), false),
        ] {
            assert_eq!(
                decode_page_fault(&h, &range.to_bytes(), MAX_PAGE_FAULT_LENGTH).is_ok(),
                ok,
                "{range:?}"
            );
        }
        let body = MemoryRange::new(0, 4096).to_bytes();
        assert!(matches!(
            decode_page_fault(&RequestHeader::new(Command::PageFault, 17), &body, 4096),
            Err(Error::PayloadLength { got: 17, .. })
        ));
        assert!(matches!(
            decode_page_fault(&RequestHeader::complete(), &body, 4096),
            Err(Error::UnexpectedCommand { .. })
        ));
        // A Memory request on a fault connection.
        let wire = RequestHeader::memory(16).to_bytes().to_vec();
        assert!(matches!(
            read_fault_request(&mut Cursor::new(wire), 4096),
            Err(Error::UnexpectedCommand {
                command: Command::Memory,
                ..
            })
        ));
        // Truncated body at every position.
        let wire = spec_request_bytes();
        for cut in 17..wire.len() {
            let e = read_fault_request(&mut Cursor::new(wire[..cut].to_vec()), 4096).unwrap_err();
            assert!(matches!(e, Error::Truncated { .. }), "{cut}: {e}");
        }
        let e = read_fault_request(&mut Cursor::new(wire[..16].to_vec()), 4096).unwrap_err();
        assert!(matches!(e, Error::ConnectionClosed { .. }));
    }

    struct Duplex<'a> {
        input: &'a mut Cursor<Vec<u8>>,
        output: &'a mut Vec<u8>,
    }

    impl Read for Duplex<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn abandon_and_clean_end() {
        let mut wire = RequestHeader::abandon().to_bytes().to_vec();
        let mut r = Cursor::new(wire.clone());
        assert_eq!(
            read_fault_request(&mut r, 4096).unwrap(),
            Some(FaultRequest::Abandon)
        );
        assert_eq!(read_fault_request(&mut r, 4096).unwrap(), None);
        let mut both = Vec::new();
        let mut done = Cursor::new(Vec::new());
        done.get_mut()
            .extend_from_slice(&ResponseHeader::ok().to_bytes());
        let mut duplex = Duplex {
            input: &mut done,
            output: &mut both,
        };
        send_fault_complete(&mut duplex).unwrap();
        assert_eq!(both, RequestHeader::complete().to_bytes());
        assert_eq!(
            read_fault_request(&mut Cursor::new(both), 4096).unwrap(),
            Some(FaultRequest::Complete)
        );
        let mut long_complete = RequestHeader::complete().to_bytes();
        long_complete[8] = 1;
        assert!(matches!(
            read_fault_request(&mut Cursor::new(long_complete.to_vec()), 4096),
            Err(Error::PayloadLength {
                command: Command::Complete,
                ..
            })
        ));
        wire[8] = 1;
        assert!(matches!(
            read_fault_request(&mut Cursor::new(wire), 4096),
            Err(Error::PayloadLength { .. })
        ));
    }
}
