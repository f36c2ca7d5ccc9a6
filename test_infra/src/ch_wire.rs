//! Cloud Hypervisor v54's ch-remote on the wire: its recorded requests (fixtures), sent
//! the way it sends them, and answers read the way it reads them. These are facts about
//! its behaviour, written down for tests that cannot run it (CI has no Cloud Hypervisor).
//!
//! A fixture file (`*.http`) is a `#` comment line naming the command line that produced
//! it, the request line, its headers, and after a blank line the body; the headers it
//! sends every time (`Host`, `Accept`) are left out of the files and added by
//! [`Fixture::wire`].
//!
//! How its client reads an answer: the status is whatever lies between `HTTP/1.1 ` and
//! the first `\r` (trimmed), parsed as an integer; a body is read only when the head has
//! `Content-Length` (otherwise it stops at the end of the head, without waiting for the
//! connection to close); every status but 100, 200 and 204 is an error whose body must be
//! a JSON array of strings, the error chain outermost first.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One recorded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixture {
    /// The file's name without `.http`.
    pub name: String,
    /// e.g. `PUT /api/v1/vm.restore HTTP/1.1`.
    pub request_line: String,
    pub body: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read fixture {0}")]
    Read(String, #[source] io::Error),
    #[error("fixture {0}: {1}")]
    Malformed(String, String),
}

impl Fixture {
    /// Reads `dir/<name>.http` and checks it is self-consistent: the recorded
    /// `Content-Length` is the length of the recorded body.
    pub fn load(dir: &Path, name: &str) -> Result<Fixture, FixtureError> {
        let path = dir.join(format!("{name}.http"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| FixtureError::Read(path.display().to_string(), e))?;
        let bad = |why: &str| FixtureError::Malformed(name.to_string(), why.to_string());
        let text = text
            .split_once('\n')
            .filter(|(comment, _)| comment.starts_with('#'))
            .map(|(_, rest)| rest)
            .ok_or_else(|| bad("no `#` comment line first"))?;
        let (head, body) = match text.split_once("\n\n") {
            Some((head, body)) => (head, Some(body.strip_suffix('\n').unwrap_or(body))),
            None => (text.trim_end_matches('\n'), None),
        };
        let mut lines = head.lines();
        let request_line = lines.next().ok_or_else(|| bad("no request line"))?;
        let mut length = None;
        for header in lines {
            match header.strip_prefix("Content-Length: ") {
                Some(v) => length = Some(v.parse::<usize>().map_err(|_| bad(header))?),
                None => return Err(bad(&format!("unexpected header {header:?}"))),
            }
        }
        if length != body.map(str::len) {
            return Err(bad(&format!(
                "Content-Length {length:?} but the body has {:?} bytes",
                body.map(str::len)
            )));
        }
        Ok(Fixture {
            name: name.to_string(),
            request_line: request_line.to_string(),
            body: body.map(str::to_string),
        })
    }

    /// The same request with `from` replaced by `to` in the body (the recorded paths and
    /// ports are another machine's). The field names, their order and every other value
    /// stay byte for byte as recorded.
    pub fn with(&self, from: &str, to: &str) -> Fixture {
        let body = self.body.as_ref().map(|b| {
            assert!(b.contains(from), "{}: no {from:?} in {b}", self.name);
            b.replace(from, to)
        });
        Fixture {
            body,
            ..self.clone()
        }
    }

    /// The endpoint, e.g. `vm.restore`.
    pub fn endpoint(&self) -> &str {
        self.request_line
            .split(' ')
            .nth(1)
            .and_then(|p| p.strip_prefix("/api/v1/"))
            .unwrap_or_default()
    }

    /// The pieces ch-remote writes, in order: the request line with `Host` and `Accept`,
    /// then `Content-Length` if there is a body, the blank line, the body.
    pub fn wire(&self) -> Vec<Vec<u8>> {
        let mut pieces = vec![
            format!(
                "{}\r\nHost: localhost\r\nAccept: */*\r\n",
                self.request_line
            )
            .into_bytes(),
        ];
        if let Some(body) = &self.body {
            pieces.push(format!("Content-Length: {}\r\n", body.len()).into_bytes());
        }
        pieces.push(b"\r\n".to_vec());
        if let Some(body) = &self.body {
            pieces.push(body.clone().into_bytes());
        }
        pieces
    }
}

/// An answer as ch-remote understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// Present only when the head had `Content-Length`.
    pub body: Option<String>,
    /// Everything read, for assertion messages.
    pub raw: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("socket I/O with the VMM")]
    Io(#[from] io::Error),
    #[error("the answer has no `HTTP/1.1` (ch-remote: missing protocol): {0:?}")]
    MissingProtocol(String),
    #[error("ch-remote cannot parse the status {status:?} of {raw:?}")]
    Status {
        status: String,
        raw: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("ch-remote cannot parse Content-Length {0:?}")]
    ContentLength(String),
    #[error("the answer is not UTF-8 (ch-remote would panic)")]
    NotUtf8,
}

impl Answer {
    /// ch-remote's test: everything but 100, 200 and 204 is an error.
    pub fn is_error(&self) -> bool {
        !matches!(self.status, 100 | 200 | 204)
    }

    /// The error chain ch-remote prints, or why it would print "Can't get remote's error
    /// messages from JSON response" instead.
    pub fn error_messages(&self) -> Result<Vec<String>, String> {
        let body = self.body.as_deref().unwrap_or_default();
        serde_json::from_str::<Vec<String>>(body)
            .map_err(|e| format!("not a JSON array of strings ({e}): {:?}", self.raw))
    }
}

/// Sends `fixture` to the API socket as ch-remote does and reads the answer as it does.
/// `timeout` bounds each read and write (receive-migration answers only when the VM has
/// arrived).
pub fn send(socket: &Path, fixture: &Fixture, timeout: Duration) -> Result<Answer, AnswerError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    for piece in fixture.wire() {
        stream.write_all(&piece)?;
    }
    stream.flush()?;
    read_answer(&mut stream)
}

/// ch-remote's reading loop, faithfully: small reads until the end of the head; then
/// stop unless `Content-Length` is there, else read until that many body bytes arrived
/// (or the connection closes).
pub fn read_answer(stream: &mut impl Read) -> Result<Answer, AnswerError> {
    let mut raw = Vec::new();
    let mut body_offset = None;
    let mut content_length = None;
    loop {
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        let text = std::str::from_utf8(&raw).map_err(|_| AnswerError::NotUtf8)?;
        if let Some(end) = text.find("\r\n\r\n") {
            body_offset = Some(end + 4);
            content_length = header(text, "Content-Length")
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| AnswerError::ContentLength(v.to_string()))
                })
                .transpose()?;
            match content_length {
                None => break,
                Some(len) if raw.len() >= end + 4 + len => break,
                Some(_) => {}
            }
        }
    }
    let raw = String::from_utf8(raw).map_err(|_| AnswerError::NotUtf8)?;
    let body = content_length.and(body_offset.map(|o| raw[o.min(raw.len())..].to_string()));
    let at = raw
        .find("HTTP/1.1")
        .ok_or_else(|| AnswerError::MissingProtocol(raw.clone()))?;
    let after = &raw[at + "HTTP/1.1 ".len().min(raw.len() - at)..];
    let status = &after[..after.find('\r').unwrap_or(after.len())];
    let code = status
        .trim()
        .parse::<u16>()
        .map_err(|source| AnswerError::Status {
            status: status.to_string(),
            raw: raw.clone(),
            source,
        })?;
    Ok(Answer {
        status: code,
        body,
        raw,
    })
}

/// The value of the first `name: ` header (ch-remote's search: anywhere in the text).
fn header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}: ");
    let start = text.find(&key)? + key.len();
    let rest = &text[start..];
    Some(&rest[..rest.find('\r').unwrap_or(rest.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_like_ch_remote() {
        let a = read_answer(&mut &b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}"[..]).unwrap();
        assert_eq!((a.status, a.body.as_deref()), (200, Some("{}")));
        // No Content-Length: no body, even if bytes follow.
        let a = read_answer(&mut &b"HTTP/1.1 204 \r\n\r\n"[..]).unwrap();
        assert_eq!((a.status, a.body), (204, None));
        let e = read_answer(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("cannot parse the status")
        );
        let a =
            read_answer(&mut &b"HTTP/1.1 404 \r\nContent-Length: 5\r\n\r\n{\"a\":1}"[..]).unwrap();
        assert!(a.is_error());
        assert!(a.error_messages().is_err(), "an object is no array");
        let a = read_answer(&mut &b"HTTP/1.1 404 \r\nContent-Length: 9\r\n\r\n[\"a\",\"b\"]"[..])
            .unwrap();
        assert_eq!(a.error_messages().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn fixtures_are_checked_and_rewritten() {
        let dir = crate::TempDir::new("ch-wire-fixture").unwrap();
        std::fs::write(
            dir.join("snap.http"),
            "# ch-remote snapshot file:///a\nPUT /api/v1/vm.snapshot HTTP/1.1\nContent-Length: 29\n\n{\"destination_url\":\"file:///a\"}\n",
        )
        .unwrap();
        let e = Fixture::load(dir.path(), "snap").unwrap_err();
        assert!(e.to_string().contains("Content-Length"), "{e}");
        std::fs::write(
            dir.join("snap.http"),
            "# ch-remote snapshot file:///a\nPUT /api/v1/vm.snapshot HTTP/1.1\nContent-Length: 31\n\n{\"destination_url\":\"file:///a\"}\n",
        )
        .unwrap();
        let f = Fixture::load(dir.path(), "snap").unwrap();
        assert_eq!(f.endpoint(), "vm.snapshot");
        let wire: Vec<u8> = f.with("/a", "/bb").wire().concat();
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 32\r\n\r\n{\"destination_url\":\"file:///bb\"}"
        );
        std::fs::write(
            dir.join("ping.http"),
            "# ch-remote ping\nGET /api/v1/vmm.ping HTTP/1.1\n",
        )
        .unwrap();
        let f = Fixture::load(dir.path(), "ping").unwrap();
        assert_eq!(f.body, None);
        assert_eq!(
            f.wire().concat(),
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
        );
    }
}
