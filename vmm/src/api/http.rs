//! HTTP/1.1 server on the API UNIX socket.
//!
//! One thread accepts connections one at a time and answers one request per connection
//! (`Connection: close`). A request is matched against the route table, turned into an
//! [`ApiRequest`] and sent to the VMM control loop, which alone owns the VM; the reply
//! comes back on a one-shot channel. Errors become a JSON body
//! `{"error": "<display>", "chain": ["<display>", "<source>", ...]}` with a status chosen
//! in one place, [`status`].

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::routes::{self, RouteError};
use super::{ApiError, ApiRequest, ApiResponse, ApiResult};
use crate::vmm::VmmEvent;

/// How long a request waits for the VMM's answer before the client gets a 504 (not for
/// long-running requests, see `ApiRequest::is_long_running`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds a slow or silent client: connections are served one at a time.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket {path} is in use by a running server")]
    SocketInUse { path: PathBuf },
    #[error("API socket path {path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot inspect API socket path {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove stale API socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot restrict the permissions of API socket {path}")]
    SetPermissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn the HTTP server thread")]
    SpawnThread(#[source] io::Error),
}

/// Binds `path` and serves the REST API on a new thread, forwarding requests to `vmm`.
pub fn start_http_server(path: &Path, vmm: Sender<VmmEvent>) -> Result<JoinHandle<()>, Error> {
    spawn_http_server(path, vmm, REPLY_TIMEOUT).map(HttpServer::into_thread)
}

/// A running server. Keep it to let `main` wait for an in-flight response (the 204 to
/// `vmm.shutdown`) before the process exits.
#[derive(Debug)]
pub struct HttpServer {
    thread: JoinHandle<()>,
    // Held by the server thread for the whole of each connection.
    busy: Arc<Mutex<()>>,
}

impl HttpServer {
    /// Waits until no connection is being served. Once the VMM's control loop is gone
    /// this returns quickly: a request still waiting for it fails at once with 503, and
    /// only a client stalling mid-request can delay it (by at most the connection
    /// timeout).
    pub fn wait_idle(&self) {
        drop(self.busy.lock().unwrap_or_else(PoisonError::into_inner));
    }

    pub fn into_thread(self) -> JoinHandle<()> {
        self.thread
    }
}

/// [`start_http_server`] with a chosen VMM reply timeout, returning an [`HttpServer`].
pub fn spawn_http_server(
    path: &Path,
    vmm: Sender<VmmEvent>,
    reply_timeout: Duration,
) -> Result<HttpServer, Error> {
    let listener = bind(path)?;
    let busy = Arc::new(Mutex::new(()));
    let server_busy = Arc::clone(&busy);
    let thread = thread::Builder::new()
        .name("http-server".to_string())
        .spawn(move || serve(listener, vmm, reply_timeout, &server_busy))
        .map_err(Error::SpawnThread)?;
    Ok(HttpServer { thread, busy })
}

fn bind(path: &Path) -> Result<UnixListener, Error> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {
            // A socket file outlives a killed VMM; only a live server answers on it.
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Inspect {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    // The API controls the whole VM: only our user may connect. (Between bind and chmod
    // the umask applies; changing the process-wide umask would race other threads.)
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::SetPermissions {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

fn serve(listener: UnixListener, vmm: Sender<VmmEvent>, reply_timeout: Duration, busy: &Mutex<()>) {
    crate::seccomp::enter(crate::seccomp::ThreadKind::HttpApi);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                // Taken before the request reaches the VMM, so any request the VMM has
                // answered is covered until its response is written.
                let _busy = busy.lock().unwrap_or_else(PoisonError::into_inner);
                handle_connection(stream, &vmm, reply_timeout);
            }
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                // Out of fds and similar: don't spin at 100% CPU while it lasts.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A parsed request.
#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// An answer before any route ran (malformed HTTP, too large...).
#[derive(Debug)]
struct Reject {
    status: u16,
    message: String,
}

impl Reject {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Reject {
            status,
            message: message.into(),
        }
    }
}

/// An HTTP response ready to be written.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    body: Option<String>,
    allow: Option<String>,
}

fn handle_connection(mut stream: UnixStream, vmm: &Sender<VmmEvent>, reply_timeout: Duration) {
    if let Err(e) = stream
        .set_read_timeout(Some(CONNECTION_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CONNECTION_TIMEOUT)))
    {
        log::warn!("API socket: cannot set timeouts: {e}");
        return;
    }
    let response = match read_request(&mut stream) {
        // Answered only once a VM has arrived, which may take minutes while the control
        // loop serves others: its wait must not hold up the next connection.
        Ok(Some(request))
            if routes::find(&request.method, &request.path)
                .is_ok_and(|r| r.endpoint == "vm.receive-migration") =>
        {
            let vmm = vmm.clone();
            let spawned = thread::Builder::new()
                .name("http-receive".to_string())
                .spawn(move || {
                    let response = respond(&request, &vmm, reply_timeout);
                    if let Err(e) = write_response(&mut stream, &response) {
                        log::debug!("API socket: cannot write the response: {e}");
                    }
                });
            if let Err(e) = spawned {
                log::warn!("API socket: cannot start a thread for receive-migration: {e}");
            }
            return;
        }
        Ok(Some(request)) => respond(&request, vmm, reply_timeout),
        // Connected and closed without a word: e.g. another VMM probing the socket.
        Ok(None) => return,
        Err(reject) => error_response(reject.status, &[reject.message]),
    };
    if let Err(e) = write_response(&mut stream, &response) {
        log::debug!("API socket: cannot write the response: {e}");
    }
}

fn read_request(stream: &mut UnixStream) -> Result<Option<Request>, Reject> {
    let io_error = |e: io::Error| Reject::new(400, format!("cannot read the request: {e}"));
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (method, path, head_len, content_length, expect_continue) = loop {
        let n = stream.read(&mut chunk).map_err(io_error)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(Reject::new(400, "the request head is incomplete"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = request.method.unwrap_or_default().to_string();
                let path = request.path.unwrap_or_default().to_string();
                let (content_length, expect_continue) = body_headers(request.headers)?;
                break (method, path, head_len, content_length, expect_continue);
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(Reject::new(431, "the request head is too large"));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Reject::new(431, "too many request headers"));
            }
            Err(e) => return Err(Reject::new(400, format!("malformed HTTP request: {e}"))),
        }
    };

    if content_length > MAX_BODY_BYTES {
        return Err(Reject::new(
            413,
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    let mut body = buf.split_off(head_len);
    if expect_continue && body.len() < content_length {
        // curl waits for this before sending a large body.
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(io_error)?;
    }
    while body.len() < content_length {
        let n = stream.read(&mut chunk).map_err(io_error)?;
        if n == 0 {
            return Err(Reject::new(
                400,
                format!(
                    "the request body ended after {} of {content_length} bytes",
                    body.len()
                ),
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    // Without keep-alive anything after the announced body is ignored.
    body.truncate(content_length);
    Ok(Some(Request { method, path, body }))
}

/// Content-Length (0 when absent) and whether the client expects `100 Continue`.
fn body_headers(headers: &[httparse::Header<'_>]) -> Result<(usize, bool), Reject> {
    let mut length = None;
    let mut expect_continue = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
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

fn respond(request: &Request, vmm: &Sender<VmmEvent>, reply_timeout: Duration) -> HttpResponse {
    let route = match routes::find(&request.method, &request.path) {
        Ok(route) => route,
        Err(RouteError::NotFound) => {
            return error_response(404, &[format!("no endpoint {}", request.path)]);
        }
        Err(RouteError::MethodNotAllowed { allowed }) => {
            let allowed = allowed.join(", ");
            let mut response = error_response(
                405,
                &[format!(
                    "{} does not accept {} (allowed: {allowed})",
                    request.path, request.method
                )],
            );
            response.allow = Some(allowed);
            return response;
        }
    };
    let api_request = match (route.handler)(&request.body) {
        Ok(api_request) => api_request,
        Err(e) => return api_response(Err(e)),
    };
    let timeout = (!api_request.is_long_running()).then_some(reply_timeout);
    match call_vmm(vmm, api_request, timeout) {
        Ok(response) => api_response(Ok(response)),
        Err(CallError::Api(e)) => api_response(Err(e)),
        Err(CallError::Timeout) => error_response(
            504,
            &[format!(
                "the VMM did not answer {} within {:?}",
                route.endpoint, reply_timeout
            )],
        ),
    }
}

enum CallError {
    Api(ApiError),
    Timeout,
}

/// Sends `request` to the control loop and waits for its single answer.
fn call_vmm(
    vmm: &Sender<VmmEvent>,
    request: ApiRequest,
    reply_timeout: Option<Duration>,
) -> Result<ApiResponse, CallError> {
    let (reply, answer) = mpsc::channel();
    vmm.send(VmmEvent::Api { request, reply })
        .map_err(|_| CallError::Api(ApiError::VmmGone))?;
    let Some(timeout) = reply_timeout else {
        return answer
            .recv()
            .map_err(|_| CallError::Api(ApiError::VmmGone))?
            .map_err(CallError::Api);
    };
    match answer.recv_timeout(timeout) {
        Ok(result) => result.map_err(CallError::Api),
        Err(RecvTimeoutError::Timeout) => Err(CallError::Timeout),
        Err(RecvTimeoutError::Disconnected) => Err(CallError::Api(ApiError::VmmGone)),
    }
}

fn api_response(result: ApiResult) -> HttpResponse {
    let json = match result {
        Ok(ApiResponse::Empty) => {
            return HttpResponse {
                status: 204,
                body: None,
                allow: None,
            };
        }
        Ok(ApiResponse::Ping(ping)) => serde_json::to_string(&ping),
        Ok(ApiResponse::Info(info)) => serde_json::to_string(&info),
        Err(e) => return error_response(status(&e), &error_chain(&e)),
    };
    match json {
        Ok(body) => HttpResponse {
            status: 200,
            body: Some(body),
            allow: None,
        },
        Err(e) => error_response(500, &[format!("cannot serialize the response: {e}")]),
    }
}

/// The one place an API error becomes an HTTP status: the caller's fault (bad input, wrong
/// state) is 4xx, ours is 5xx.
pub fn status(error: &ApiError) -> u16 {
    match error {
        ApiError::BadRequest(_) => 400,
        // 409 rather than 404 for a missing VM: 404 means "no such endpoint", while this
        // is the VMM's state not fitting the request, like pausing a paused VM.
        ApiError::InvalidState { .. } | ApiError::NoVm | ApiError::Conflict(_) => 409,
        ApiError::Internal { .. } => 500,
        ApiError::VmmGone => 503,
    }
}

/// The error's message followed by each of its sources.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut chain = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    chain
}

fn error_response(status: u16, chain: &[String]) -> HttpResponse {
    let body = serde_json::json!({
        "error": chain.first().cloned().unwrap_or_default(),
        "chain": chain,
    });
    HttpResponse {
        status,
        body: Some(body.to_string()),
        allow: None,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

fn write_response(stream: &mut impl Write, response: &HttpResponse) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: Cloud Hypervisor API\r\nConnection: close\r\n",
        response.status,
        reason(response.status)
    );
    if let Some(allow) = &response.allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    match &response.body {
        Some(body) => {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            out.push_str(body);
        }
        // A 204 has no body and, per RFC 9110, no Content-Length.
        None => out.push_str("\r\n"),
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{VmInfoResponse, VmState, VmmPingResponse};
    use crate::config::{
        ConsoleConfig, ConsoleOutputMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig,
    };
    use api_client::{Response, simple_api_command};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A socket path in a fresh directory that is removed on drop.
    struct TempSocket(PathBuf);

    impl std::ops::Deref for TempSocket {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TempSocket {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }

    fn temp_socket() -> TempSocket {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "http_test_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempSocket(dir.join("api.sock"))
    }

    fn config() -> VmConfig {
        let off = ConsoleConfig {
            file: None,
            mode: ConsoleOutputMode::Off,
        };
        VmConfig {
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
            memory: MemoryConfig {
                size: 1 << 20,
                shared: false,
                thp: false,
            },
            payload: PayloadConfig {
                kernel: None,
                cmdline: None,
                initramfs: None,
            },
            serial: off.clone(),
            console: off,
        }
    }

    /// A stand-in for the control loop: answers each request with a fixed result.
    fn fake_vmm() -> Sender<VmmEvent> {
        let (tx, rx) = mpsc::channel::<VmmEvent>();
        thread::spawn(move || {
            for event in rx {
                let VmmEvent::Api { request, reply } = event else {
                    continue;
                };
                let result = match request {
                    ApiRequest::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse {
                        build_version: "test".to_string(),
                        version: "0.1.0".to_string(),
                        pid: 42,
                        features: vec![],
                    })),
                    ApiRequest::VmInfo => Ok(ApiResponse::Info(Box::new(VmInfoResponse {
                        config: config(),
                        state: VmState::Running,
                        memory_actual_size: 1 << 20,
                        memory_restore: None,
                        migration: None,
                    }))),
                    ApiRequest::VmPause => Err(ApiError::InvalidState {
                        action: "pause",
                        state: VmState::Paused,
                    }),
                    ApiRequest::VmResume => Ok(ApiResponse::Empty),
                    ApiRequest::VmShutdown => Err(ApiError::Internal {
                        action: "shutdown",
                        message: "KVM said no".to_string(),
                    }),
                    ApiRequest::VmmShutdown => Err(ApiError::NoVm),
                    ApiRequest::VmSnapshot { .. } => Err(ApiError::Conflict("busy".into())),
                    ApiRequest::VmRestore(_)
                    | ApiRequest::VmSendMigration(_)
                    | ApiRequest::VmReceiveMigration { .. }
                    | ApiRequest::VmCancelMigration => Ok(ApiResponse::Empty),
                };
                let _ = reply.send(result);
            }
        });
        tx
    }

    fn server() -> TempSocket {
        let path = temp_socket();
        start_http_server(&path, fake_vmm()).unwrap();
        path
    }

    fn call(sock: &Path, method: &str, endpoint: &str, body: Option<&str>) -> Response {
        simple_api_command(sock, method, endpoint, body).unwrap()
    }

    /// Sends raw bytes and returns the raw response.
    fn raw(sock: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(sock).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn error_json(resp: &Response) -> serde_json::Value {
        serde_json::from_str(&resp.body).unwrap()
    }

    #[test]
    fn ping_and_info_are_200_json() {
        let sock = server();
        let resp = call(&sock, "GET", "vmm.ping", None);
        assert_eq!(resp.status, 200);
        let ping: VmmPingResponse = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(ping.pid, 42);

        let resp = call(&sock, "GET", "vm.info", None);
        assert_eq!(resp.status, 200);
        let info: VmInfoResponse = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(info.state, VmState::Running);
        assert_eq!(info.config, config());
    }

    #[test]
    fn empty_is_204() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.resume", None);
        assert_eq!((resp.status, resp.body.as_str()), (204, ""));
        let resp = call(&sock, "PUT", "vm.resume", Some("{}"));
        assert_eq!(resp.status, 204);
        let text = raw(&sock, b"PUT /api/v1/vm.resume HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
    }

    #[test]
    fn api_errors_map_to_statuses_with_chain() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.pause", None);
        assert_eq!(resp.status, 409);
        let json = error_json(&resp);
        assert_eq!(json["error"], "cannot pause a VM that is Paused");
        assert_eq!(json["chain"][0], "cannot pause a VM that is Paused");

        assert_eq!(call(&sock, "PUT", "vmm.shutdown", None).status, 409);
        let resp = call(&sock, "PUT", "vm.shutdown", None);
        assert_eq!(resp.status, 500);
        assert_eq!(resp.error_message(), "shutdown failed: KVM said no");
    }

    #[test]
    fn status_mapping() {
        assert_eq!(status(&ApiError::BadRequest(String::new())), 400);
        assert_eq!(
            status(&ApiError::InvalidState {
                action: "pause",
                state: VmState::Created
            }),
            409
        );
        assert_eq!(status(&ApiError::NoVm), 409);
        assert_eq!(
            status(&ApiError::Internal {
                action: "x",
                message: String::new()
            }),
            500
        );
        assert_eq!(status(&ApiError::VmmGone), 503);
    }

    #[test]
    fn bad_bodies_are_400() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.pause", Some("{not json"));
        assert_eq!(resp.status, 400);
        assert!(
            resp.error_message()
                .starts_with("bad request: invalid JSON body")
        );
        let resp = call(&sock, "PUT", "vm.pause", Some("{\"force\":true}"));
        assert_eq!(resp.status, 400);
        assert!(resp.error_message().contains("unknown field `force`"));
    }

    #[test]
    fn unknown_path_is_404() {
        let sock = server();
        let resp = call(&sock, "GET", "vm.nothing", None);
        assert_eq!(resp.status, 404);
        assert_eq!(error_json(&resp)["error"], "no endpoint /api/v1/vm.nothing");
        assert_eq!(call(&sock, "GET", "/vm.info", None).status, 404);
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.info", None);
        assert_eq!(resp.status, 405);
        assert!(resp.error_message().contains("allowed: GET"));
        let text = raw(&sock, b"DELETE /api/v1/vm.pause HTTP/1.1\r\n\r\n");
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: PUT\r\n"), "{text}");
    }

    #[test]
    fn malformed_http_is_rejected() {
        let sock = server();
        let text = raw(&sock, b"GARBAGE\x01\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        let text = raw(
            &sock,
            b"GET /api/v1/vm.info HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        let text = raw(
            &sock,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 501 "), "{text}");
        let text = raw(
            &sock,
            format!(
                "PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY_BYTES + 1
            )
            .as_bytes(),
        );
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
        let mut huge = b"GET /api/v1/vm.info HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        let text = raw(&sock, &huge);
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        // The server keeps serving after bad clients.
        assert_eq!(call(&sock, "GET", "vmm.ping", None).status, 200);
    }

    #[test]
    fn truncated_body_is_400() {
        let sock = server();
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")
            .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains("ended after 2 of 10 bytes"), "{out}");
    }

    #[test]
    fn expect_continue_is_honoured() {
        let sock = server();
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(
            b"PUT /api/v1/vm.resume HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap();
        let mut buf = [0u8; 25];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"{}").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 204 "), "{out}");
    }

    #[test]
    fn vmm_gone_is_503() {
        let path = temp_socket();
        let (tx, rx) = mpsc::channel();
        drop(rx);
        start_http_server(&path, tx).unwrap();
        let resp = call(&path, "GET", "vmm.ping", None);
        assert_eq!(resp.status, 503);
        assert_eq!(resp.error_message(), "the VMM is shutting down");
    }

    #[test]
    fn silent_vmm_is_504() {
        let path = temp_socket();
        let (tx, rx) = mpsc::channel::<VmmEvent>();
        // Holds the requests (and their reply senders) without answering.
        let hoarder = thread::spawn(move || rx.iter().collect::<Vec<_>>());
        spawn_http_server(&path, tx, Duration::from_millis(50)).unwrap();
        let resp = call(&path, "GET", "vm.info", None);
        assert_eq!(resp.status, 504);
        assert!(resp.error_message().contains("did not answer vm.info"));
        drop(hoarder);
    }

    #[test]
    fn wait_idle_returns_after_served_requests() {
        let path = temp_socket();
        let server = spawn_http_server(&path, fake_vmm(), REPLY_TIMEOUT).unwrap();
        server.wait_idle();
        assert_eq!(call(&path, "PUT", "vm.resume", None).status, 204);
        server.wait_idle();
        assert!(!server.into_thread().is_finished());
    }

    #[test]
    fn socket_is_private() {
        let sock = server();
        let mode = fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn live_socket_is_refused_and_stale_one_replaced() {
        let sock = server();
        let err = start_http_server(&sock, fake_vmm()).unwrap_err();
        assert!(matches!(err, Error::SocketInUse { .. }), "{err}");

        let stale = temp_socket();
        drop(UnixListener::bind(&stale).unwrap()); // leaves the file, nobody listening
        start_http_server(&stale, fake_vmm()).unwrap();
        assert_eq!(call(&stale, "GET", "vmm.ping", None).status, 200);

        let file = temp_socket();
        fs::write(&file, "not a socket").unwrap();
        let err = start_http_server(&file, fake_vmm()).unwrap_err();
        assert!(matches!(err, Error::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "not a socket");
    }
}
