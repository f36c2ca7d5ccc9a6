//! The HTTP/1.1 request parser, without I/O: the server feeds it bytes as they arrive and
//! it answers "more", "send 100 Continue", a whole request, or a rejection with its
//! status. Keeping it free of sockets lets the fuzz targets drive it with arbitrary bytes
//! split at arbitrary points.
//!
//! Memory is bounded by the caps, whatever the peer sends: the parser never holds more
//! than [`MAX_HEAD_BYTES`] of head plus the announced body (at most [`MAX_BODY_BYTES`]),
//! and it grows the body buffer as bytes arrive rather than reserving what a peer merely
//! announces.

/// The longest request head accepted (request line and headers); longer is a 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// The most headers accepted; more is a 431.
pub const MAX_HEADERS: usize = 32;
/// The largest body accepted (the biggest API body is a few hundred bytes); larger is a
/// 413, refused before any of it is read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// An answer before any route ran: the status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub message: String,
}

impl Reject {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Reject {
            status,
            message: message.into(),
        }
    }
}

/// What the server should do after feeding bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseStep {
    /// Read more.
    NeedMore,
    /// The client waits for `100 Continue` before it sends the body: send it, then read
    /// more. Reported once.
    SendContinue,
    Complete(Request),
}

#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    content_length: usize,
}

/// Parses one request from bytes fed in any split.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// The head until it parses; after that, the body.
    buf: Vec<u8>,
    head: Option<Head>,
    continue_pending: bool,
    done: bool,
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held now (head or body): never more than `MAX_HEAD_BYTES + MAX_BODY_BYTES`.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds the next bytes read from the client. After `Complete` or an error the parser
    /// is finished; anything fed later is ignored (without keep-alive, bytes after the
    /// announced body have no meaning).
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<ParseStep, Reject> {
        if self.done {
            return Ok(ParseStep::NeedMore);
        }
        let result = self.feed_inner(&mut bytes);
        if !matches!(result, Ok(ParseStep::NeedMore | ParseStep::SendContinue)) {
            self.done = true;
        }
        result
    }

    fn feed_inner(&mut self, bytes: &mut &[u8]) -> Result<ParseStep, Reject> {
        if self.head.is_none() {
            // Take no more than the head may need, so a flood never grows the buffer
            // past the cap; what is left over after the head is body.
            let room = MAX_HEAD_BYTES - self.buf.len();
            let (now, later) = bytes.split_at(bytes.len().min(room));
            grow_within(&mut self.buf, now.len(), MAX_HEAD_BYTES);
            self.buf.extend_from_slice(now);
            *bytes = later;
            match self.parse_head()? {
                Some(head) => {
                    let head_len = head.0;
                    self.head = Some(head.1);
                    let body = self.buf.split_off(head_len);
                    self.buf = Vec::new();
                    self.push_body(&body);
                }
                None if self.buf.len() >= MAX_HEAD_BYTES => {
                    return Err(Reject::new(431, "the request head is too large"));
                }
                None => return Ok(ParseStep::NeedMore),
            }
        }
        self.push_body(bytes);
        let Some(head) = &self.head else {
            return Ok(ParseStep::NeedMore);
        };
        if self.buf.len() >= head.content_length {
            return Ok(ParseStep::Complete(Request {
                method: head.method.clone(),
                path: head.path.clone(),
                body: std::mem::take(&mut self.buf),
            }));
        }
        if std::mem::take(&mut self.continue_pending) {
            return Ok(ParseStep::SendContinue);
        }
        Ok(ParseStep::NeedMore)
    }

    /// `Some((head length, head))` once the head is complete.
    fn parse_head(&mut self) -> Result<Option<(usize, Head)>, Reject> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Reject::new(431, "too many request headers"));
            }
            Err(e) => return Err(Reject::new(400, format!("malformed HTTP request: {e}"))),
        };
        let (content_length, expect_continue) = body_headers(request.headers)?;
        if content_length > MAX_BODY_BYTES {
            return Err(Reject::new(
                413,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            ));
        }
        let head = Head {
            method: request.method.unwrap_or_default().to_string(),
            path: request.path.unwrap_or_default().to_string(),
            content_length,
        };
        // curl waits for this before sending a body; only useful if the body is not
        // already here.
        self.continue_pending = expect_continue && self.buf.len() - head_len < content_length;
        Ok(Some((head_len, head)))
    }

    /// Appends body bytes up to the announced length, growing the buffer as data
    /// arrives.
    fn push_body(&mut self, bytes: &[u8]) {
        let Some(head) = &self.head else {
            return;
        };
        let wanted = head.content_length.saturating_sub(self.buf.len());
        let take = &bytes[..bytes.len().min(wanted)];
        grow_within(&mut self.buf, take.len(), head.content_length);
        self.buf.extend_from_slice(take);
    }

    /// The client closed its side. `Ok(None)`: it never sent a byte (e.g. a VMM probing
    /// whether the socket is live), nothing to answer.
    pub fn finish(&self) -> Result<Option<Request>, Reject> {
        match &self.head {
            None if self.buf.is_empty() => Ok(None),
            None => Err(Reject::new(400, "the request head is incomplete")),
            Some(head) => Err(Reject::new(
                400,
                format!(
                    "the request body ended after {} of {} bytes",
                    self.buf.len(),
                    head.content_length
                ),
            )),
        }
    }
}

/// Makes room for `extra` more bytes in `buf` by amortized doubling, but never past
/// `limit` bytes of capacity (the caller never stores more than `limit`), so a buffer
/// is at most as large as its cap.
fn grow_within(buf: &mut Vec<u8>, extra: usize, limit: usize) {
    let needed = buf.len() + extra;
    if needed > buf.capacity() {
        let target = needed.max(buf.capacity().saturating_mul(2)).min(limit);
        buf.reserve_exact(target.max(needed) - buf.len());
    }
}

/// Content-Length (0 when absent) and whether the client expects `100 Continue`.
fn body_headers(headers: &[httparse::Header<'_>]) -> Result<(usize, bool), Reject> {
    let mut length = None;
    let mut expect_continue = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .map(str::trim)
                // `usize::from_str` takes a leading `+`; RFC 9110 allows digits only.
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| Reject::new(400, "invalid Content-Length header"))?;
            if length.is_some_and(|l| l != value) {
                return Err(Reject::new(400, "conflicting Content-Length headers"));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Reject::new(
                501,
                "Transfer-Encoding is not supported; send Content-Length",
            ));
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = header.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok((length.unwrap_or(0), expect_continue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Result<ParseStep, Reject> {
        let mut p = RequestParser::new();
        for c in chunks {
            let r = p.feed(c);
            if !matches!(r, Ok(ParseStep::NeedMore | ParseStep::SendContinue)) {
                return r;
            }
        }
        Ok(ParseStep::NeedMore)
    }

    #[test]
    fn whole_and_split_requests() {
        let text = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}trailing";
        let want = ParseStep::Complete(Request {
            method: "PUT".into(),
            path: "/api/v1/vm.pause".into(),
            body: b"{}".to_vec(),
        });
        assert_eq!(parse_all(&[text]), Ok(want.clone()));
        for split in 0..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(parse_all(&[a, b]), Ok(want.clone()), "split at {split}");
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(parse_all(&bytes), Ok(want));
    }

    #[test]
    fn continue_is_asked_once_and_only_without_body() {
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        let mut p = RequestParser::new();
        assert_eq!(p.feed(head), Ok(ParseStep::SendContinue));
        assert_eq!(p.feed(b"{"), Ok(ParseStep::NeedMore));
        assert!(matches!(p.feed(b"}"), Ok(ParseStep::Complete(_))));
        let mut with_body = head.to_vec();
        with_body.extend_from_slice(b"{}");
        assert!(matches!(
            parse_all(&[&with_body]),
            Ok(ParseStep::Complete(_))
        ));
    }

    #[test]
    fn caps_and_bad_headers() {
        let status = |r: Result<ParseStep, Reject>| r.unwrap_err().status;
        let flood = vec![b'a'; 3 * MAX_HEAD_BYTES];
        let mut p = RequestParser::new();
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.extend_from_slice(&flood);
        assert_eq!(p.feed(&head).unwrap_err().status, 431);
        assert!(p.buffered() <= MAX_HEAD_BYTES);
        let big = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(status(parse_all(&[big.as_bytes()])), 413);
        assert_eq!(
            status(parse_all(&[
                b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"
            ])),
            400
        );
        assert_eq!(
            status(parse_all(&[
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            ])),
            400
        );
        assert_eq!(
            status(parse_all(&[
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ])),
            501
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status(parse_all(&[text.as_bytes()])), 431);
        assert_eq!(status(parse_all(&[b"GARBAGE\x01\r\n\r\n"])), 400);
    }

    #[test]
    fn announced_body_is_not_reserved() {
        let head = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        let mut p = RequestParser::new();
        assert_eq!(p.feed(head.as_bytes()), Ok(ParseStep::NeedMore));
        assert_eq!(p.feed(b"abc"), Ok(ParseStep::NeedMore));
        assert!(p.buf.capacity() < 4096, "{}", p.buf.capacity());
        assert_eq!(
            p.finish().unwrap_err().message,
            format!("the request body ended after 3 of {MAX_BODY_BYTES} bytes")
        );
    }

    #[test]
    fn finish_before_anything_is_silent() {
        assert_eq!(RequestParser::new().finish(), Ok(None));
        let mut p = RequestParser::new();
        p.feed(b"GET /").unwrap();
        assert_eq!(p.finish().unwrap_err().status, 400);
    }
}
