//! A tiny blocking HTTP/1.1 client for the VMM's REST API on a UNIX socket.
//!
//! One request per connection (`Connection: close`), which is all `ch-remote` and the
//! integration tests need, and keeps the client free of any HTTP crate beyond `httparse`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The prefix every endpoint of the REST API lives under.
pub const API_PREFIX: &str = "/api/v1/";

/// The response head is small; anything larger is not our server talking.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Bounds the body we are willing to buffer (a `vm.info` is a few KiB).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
const MAX_HEADERS: usize = 64;

/// Why a request failed before an HTTP status could be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set a timeout on the API socket")]
    SetTimeout(#[source] io::Error),
    #[error("cannot send the {method} {path} request")]
    Write {
        method: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the response to {method} {path}")]
    Read {
        method: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed HTTP response: {0}")]
    MalformedResponse(String),
    #[error("HTTP response is larger than {limit} bytes")]
    ResponseTooLarge { limit: usize },
    #[error("HTTP response body is not UTF-8")]
    BodyNotUtf8(#[source] std::string::FromUtf8Error),
}

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// True for 2xx statuses.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The server's error message: the outermost message of a JSON error body (an array
    /// of strings, as Cloud Hypervisor and we answer; or our older `{"error": ...}`
    /// object), else the raw body (trimmed), else the bare status.
    pub fn error_message(&self) -> String {
        if let Some(first) = self.error_chain().into_iter().next() {
            return first;
        }
        let trimmed = self.body.trim();
        if trimmed.is_empty() {
            format!("HTTP status {}", self.status)
        } else {
            trimmed.to_string()
        }
    }

    /// Every message of a JSON error body, outermost first (empty when the body is not
    /// one): the array itself, or the `chain` of the older object shape.
    pub fn error_chain(&self) -> Vec<String> {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&self.body) else {
            return Vec::new();
        };
        let items = match &value {
            serde_json::Value::Array(items) => items,
            serde_json::Value::Object(map) => match map.get("chain") {
                Some(serde_json::Value::Array(items)) => items,
                _ => return Vec::new(),
            },
            _ => return Vec::new(),
        };
        items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect()
    }
}

/// Turns `vm.info` into `/api/v1/vm.info`; a path starting with `/` is used as is.
pub fn endpoint_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{API_PREFIX}{path}")
    }
}

/// Sends one request and waits for the whole response, however long the server takes
/// (a migration request answers only when the migration is over).
pub fn simple_api_command(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, Error> {
    api_command(socket, method, path, body, None)
}

/// Like [`simple_api_command`], but each read or write on the socket gives up after
/// `timeout` (so a test does not hang on a wedged VMM).
pub fn api_command(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Option<Duration>,
) -> Result<Response, Error> {
    let path = endpoint_path(path);
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    if let Some(timeout) = timeout {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(Error::SetTimeout)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(Error::SetTimeout)?;
    }

    let request = format_request(method, &path, body);
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|source| Error::Write {
            method: method.to_string(),
            path: path.clone(),
            source,
        })?;

    read_response(&mut stream).map_err(|e| match e {
        ReadError::Io(source) => Error::Read {
            method: method.to_string(),
            path,
            source,
        },
        ReadError::Other(e) => e,
    })
}

fn format_request(method: &str, path: &str, body: Option<&str>) -> String {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nConnection: close\r\n"
    );
    match body {
        Some(body) => {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            request.push_str(body);
        }
        // A body-less PUT still says so explicitly, as curl and CH's ch-remote do.
        None if method != "GET" => request.push_str("Content-Length: 0\r\n\r\n"),
        None => request.push_str("\r\n"),
    }
    request
}

enum ReadError {
    Io(io::Error),
    Other(Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Other(e)
    }
}

fn read_response(stream: &mut impl Read) -> Result<Response, ReadError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    // Read until the head parses; it may arrive in pieces.
    let (status, head_len, content_length) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::MalformedResponse(if buf.is_empty() {
                "the server closed the connection without answering".to_string()
            } else {
                "the connection closed inside the response head".to_string()
            })
            .into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response
                    .code
                    .ok_or_else(|| Error::MalformedResponse("no status code".to_string()))?;
                let content_length = match body_framing(status, response.headers)? {
                    Framing::Length(n) => Some(n),
                    Framing::None => Some(0),
                    Framing::UntilClose => None,
                };
                break (status, head_len, content_length);
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(Error::ResponseTooLarge {
                    limit: MAX_HEAD_BYTES,
                }
                .into());
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Error::MalformedResponse(e.to_string()).into()),
        }
    };

    let mut body = buf.split_off(head_len);
    match content_length {
        Some(len) => {
            if len > MAX_BODY_BYTES {
                return Err(Error::ResponseTooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into());
            }
            while body.len() < len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(Error::MalformedResponse(format!(
                        "body ended after {} of {len} bytes",
                        body.len()
                    ))
                    .into());
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        // No length: the body runs until the server closes the connection.
        None => loop {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            if body.len() > MAX_BODY_BYTES {
                return Err(Error::ResponseTooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into());
            }
        },
    }
    let body = String::from_utf8(body).map_err(Error::BodyNotUtf8)?;
    Ok(Response { status, body })
}

enum Framing {
    Length(usize),
    None,
    UntilClose,
}

/// How the body ends. 1xx, 204 and 304 never carry one (RFC 9110 6.4.1; Cloud Hypervisor answers 204
/// without a Content-Length and keeps the connection open), and neither does a
/// keep-alive answer without a length; otherwise a body without a length runs until
/// the server closes the connection.
fn body_framing(status: u16, headers: &[httparse::Header<'_>]) -> Result<Framing, Error> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    if let Some(n) = content_length(headers)? {
        return Ok(Framing::Length(n));
    }
    let keep_alive = headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection")
            && std::str::from_utf8(h.value)
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("keep-alive"))
    });
    Ok(if keep_alive {
        Framing::None
    } else {
        Framing::UntilClose
    })
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<usize>, Error> {
    let mut length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::MalformedResponse(
                "chunked transfer encoding is not supported".to_string(),
            ));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::MalformedResponse(format!(
                        "bad Content-Length {:?}",
                        String::from_utf8_lossy(header.value)
                    ))
                })?;
            length = Some(value);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A one-shot server: accepts one connection, returns the raw request it read (up to
    /// the end of the head plus any body it announced) and answers with `reply`.
    fn one_shot_server(reply: &'static [u8]) -> (TempSocket, thread::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!(
            "api_client_test_{}_{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                let n = conn.read(&mut chunk).unwrap();
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap_or(0);
                    if request.len() >= head_end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            conn.write_all(reply).unwrap();
            String::from_utf8(request).unwrap()
        });
        (TempSocket(path), handle)
    }

    /// A socket path whose directory is removed on drop.
    struct TempSocket(PathBuf);

    impl std::ops::Deref for TempSocket {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn unique() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn get_with_content_length() {
        let (sock, server) = one_shot_server(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":true}\n",
        );
        let resp = simple_api_command(&sock, "GET", "vmm.ping", None).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, "{\"a\":true}\n");
        assert!(resp.is_success());
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /api/v1/vmm.ping HTTP/1.1\r\n"));
        assert!(!request.contains("Content-Length"));
    }

    #[test]
    fn put_with_body_and_full_path() {
        let (sock, server) = one_shot_server(b"HTTP/1.1 204 No Content\r\n\r\n");
        let resp = simple_api_command(&sock, "PUT", "/api/v1/vm.pause", Some("{\"x\":1}")).unwrap();
        assert_eq!(resp.status, 204);
        assert_eq!(resp.body, "");
        let request = server.join().unwrap();
        assert!(request.starts_with("PUT /api/v1/vm.pause HTTP/1.1\r\n"));
        assert!(request.contains("Content-Length: 7\r\n"));
        assert!(request.ends_with("\r\n\r\n{\"x\":1}"));
    }

    #[test]
    fn put_without_body_sends_zero_length() {
        let (sock, server) =
            one_shot_server(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        let resp = simple_api_command(&sock, "PUT", "vm.resume", None).unwrap();
        assert_eq!(resp.status, 204);
        assert!(server.join().unwrap().contains("Content-Length: 0\r\n"));
    }

    #[test]
    fn body_until_close_and_error_message() {
        let (sock, server) = one_shot_server(
            b"HTTP/1.1 409 Conflict\r\n\r\n{\"error\":\"cannot pause\",\"chain\":[\"cannot pause\",\"because\"]}",
        );
        let resp = simple_api_command(&sock, "PUT", "vm.pause", None).unwrap();
        server.join().unwrap();
        assert_eq!(resp.status, 409);
        assert!(!resp.is_success());
        assert_eq!(resp.error_message(), "cannot pause");
        assert_eq!(resp.error_chain(), vec!["cannot pause", "because"]);
    }

    /// Cloud Hypervisor's (and our) status line has no reason phrase; the error body is
    /// a JSON array.
    #[test]
    fn status_line_without_reason_and_array_error_body() {
        let (sock, server) = one_shot_server(
            b"HTTP/1.1 404 \r\nContent-Type: application/json\r\nContent-Length: 38\r\n\r\n[\"Error from API\",\"VM is not created\"]",
        );
        let resp = simple_api_command(&sock, "GET", "vm.info", None).unwrap();
        server.join().unwrap();
        assert_eq!(resp.status, 404);
        assert_eq!(resp.error_message(), "Error from API");
        assert_eq!(
            resp.error_chain(),
            vec!["Error from API", "VM is not created"]
        );
        let (sock, server) = one_shot_server(b"HTTP/1.1 204 \r\n\r\n");
        let resp = simple_api_command(&sock, "PUT", "vm.resume", None).unwrap();
        server.join().unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (204, ""));
    }

    /// A 204 is complete at the end of its head, even if the server keeps the connection
    /// open (Cloud Hypervisor's does).
    #[test]
    fn no_content_does_not_wait_for_the_close() {
        let dir = std::env::temp_dir().join(format!(
            "api_client_keepalive_{}_{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = TempSocket(dir.join("api.sock"));
        let listener = UnixListener::bind(&*sock).unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).unwrap();
            conn.write_all(b"HTTP/1.1 204 \r\n\r\n").unwrap();
            // Holds the connection open until the client has its answer.
            let _ = released.recv_timeout(Duration::from_secs(10));
        });
        let resp =
            api_command(&sock, "PUT", "vm.pause", None, Some(Duration::from_secs(5))).unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (204, ""));
        release.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn error_message_falls_back_to_raw_body_and_status() {
        let raw = Response {
            status: 500,
            body: " oops \n".to_string(),
        };
        assert_eq!(raw.error_message(), "oops");
        assert!(raw.error_chain().is_empty());
        let empty = Response {
            status: 503,
            body: String::new(),
        };
        assert_eq!(empty.error_message(), "HTTP status 503");
    }

    /// Cloud Hypervisor's server: no reason phrase, no length on a 204, and the
    /// connection stays open after the answer.
    #[test]
    fn no_content_keep_alive_answer_does_not_wait_for_close() {
        let dir = std::env::temp_dir().join(format!(
            "api_client_test_{}_{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = TempSocket(dir.join("api.sock"));
        let listener = UnixListener::bind(&*sock).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut chunk = [0u8; 1024];
            let _ = conn.read(&mut chunk).unwrap();
            conn.write_all(
                b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n",
            )
            .unwrap();
            // Open until the client has its answer (or gave up).
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        });
        let resp = api_command(&sock, "PUT", "vm.pause", None, Some(Duration::from_secs(2)));
        done_tx.send(()).unwrap();
        server.join().unwrap();
        let resp = resp.unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (204, ""));
    }

    #[test]
    fn truncated_body_is_an_error() {
        let (sock, server) =
            one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort");
        let err = simple_api_command(&sock, "GET", "vm.info", None).unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(&err, Error::MalformedResponse(m) if m.contains("5 of 100")),
            "{err}"
        );
    }

    #[test]
    fn garbage_response_is_an_error() {
        let (sock, server) = one_shot_server(b"NOT HTTP AT ALL\r\n\r\n");
        let err = simple_api_command(&sock, "GET", "vm.info", None).unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, Error::MalformedResponse(_)), "{err}");
    }

    #[test]
    fn closed_without_answer_is_an_error() {
        let (sock, server) = one_shot_server(b"");
        let err = simple_api_command(&sock, "GET", "vm.info", None).unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(&err, Error::MalformedResponse(m) if m.contains("without answering")),
            "{err}"
        );
    }

    #[test]
    fn connect_error_names_the_socket() {
        let path = Path::new("/nonexistent/dir/api.sock");
        let err = simple_api_command(path, "GET", "vmm.ping", None).unwrap_err();
        assert!(matches!(err, Error::Connect { .. }));
        assert_eq!(
            err.to_string(),
            "cannot connect to the API socket /nonexistent/dir/api.sock"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn endpoint_path_prefixes_short_names() {
        assert_eq!(endpoint_path("vm.info"), "/api/v1/vm.info");
        assert_eq!(endpoint_path("/api/v1/vm.info"), "/api/v1/vm.info");
    }
}
