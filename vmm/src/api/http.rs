//! HTTP/1.1 server on the API UNIX socket.
//!
//! One thread accepts connections and gives each its own thread, up to
//! [`ApiLimits::max_connections`]; one more is answered 503 and closed, so idle or slow
//! clients cannot block other clients, and cannot make the VMM start unbounded threads.
//! A request (head and body) must arrive within [`ApiLimits::request_timeout`] in total,
//! however its client paces the bytes (408 otherwise). Each connection answers one
//! request (`Connection: close`): parsed by [`parser`](super::parser), matched against
//! the route table, turned into an [`ApiRequest`] and sent to the VMM control loop,
//! which alone owns the VM and handles requests one at a time in arrival order; the
//! reply comes back on a one-shot channel. A request whose client hung up while it
//! waited for the control loop is dropped unrun (see [`Reply::abandoned`]).
//!
//! Answers are written as Cloud Hypervisor's server writes them, so its ch-remote reads
//! ours: the status line is `HTTP/1.1 <code> \r\n` (no reason phrase, which its client
//! cannot parse), and a body always comes with `Content-Length`. Errors become a JSON
//! array of strings, the error chain outermost first (`["snapshot failed", "<why>",
//! ...]`), with a status chosen in one place, [`status`].

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::parser::{ParseStep, Reject, Request, RequestParser};
use super::routes::{self, RouteError};
use super::{ApiCall, ApiError, ApiRequest, ApiResponse, ApiResult};
pub use crate::config::options::ApiLimits;
use crate::events::Notifier;
use event_monitor::Event;

/// The default of [`ApiLimits::reply_timeout`].
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection thread only parses a bounded request and routes it (serde_json limits
/// nesting to 128 levels), so it needs far less than the default 2 MiB.
const CONNECTION_STACK: usize = 512 * 1024;
/// How much unread request is drained before a refused connection is closed.
const DRAIN_BYTES: usize = 64 * 1024;

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

/// Binds `path` and serves the REST API on a new thread with the default limits,
/// forwarding requests to `vmm`.
pub fn start_http_server(path: &Path, vmm: Notifier<ApiCall>) -> Result<JoinHandle<()>, Error> {
    spawn_http_server(path, vmm, ApiLimits::default()).map(HttpServer::into_thread)
}

/// A running server. Keep it to let `main` wait for an in-flight response (the 204 to
/// `vmm.shutdown`) before the process exits.
#[derive(Debug)]
pub struct HttpServer {
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl HttpServer {
    /// Waits until every answer the control loop gave has been written to its client
    /// (at most the request timeout, which also bounds each write). Once the control
    /// loop is gone, requests fail at once with 503, so nothing new starts to wait.
    pub fn wait_idle(&self) {
        let answering = self
            .shared
            .answering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let _ = self.shared.idle.wait_timeout_while(
            answering,
            self.shared.limits.request_timeout,
            |n| *n > 0,
        );
    }

    pub fn into_thread(self) -> JoinHandle<()> {
        self.thread
    }
}

/// [`start_http_server`] with chosen limits, returning an [`HttpServer`].
pub fn spawn_http_server(
    path: &Path,
    vmm: Notifier<ApiCall>,
    limits: ApiLimits,
) -> Result<HttpServer, Error> {
    spawn_http_server_on(bind(path)?, vmm, limits)
}

/// [`spawn_http_server`] on a socket that is already listening (`--api-socket fd=N`).
pub fn spawn_http_server_on(
    listener: UnixListener,
    vmm: Notifier<ApiCall>,
    limits: ApiLimits,
) -> Result<HttpServer, Error> {
    let shared = Arc::new(Shared {
        vmm,
        limits,
        open: AtomicUsize::new(0),
        answering: Mutex::new(0),
        idle: Condvar::new(),
    });
    let server_shared = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("http-server".to_string())
        .spawn(move || serve(&listener, &server_shared))
        .map_err(Error::SpawnThread)?;
    Ok(HttpServer { thread, shared })
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

/// What the acceptor and the connection threads share.
#[derive(Debug)]
struct Shared {
    vmm: Notifier<ApiCall>,
    limits: ApiLimits,
    /// Connection slots taken (see [`Slot`]).
    open: AtomicUsize,
    /// Answers the control loop gave that are not yet written (see [`Answering`]).
    answering: Mutex<usize>,
    idle: Condvar,
}

/// One of the `max_connections` slots. It is shared by the connection's thread and the
/// request it sent to the control loop, and is free only when both are gone: a request
/// still queued in a busy control loop keeps its slot after its client gave up (504), so
/// a wedged VMM cannot be made to queue requests (and their fds) without bound.
#[derive(Debug)]
struct Slot(Arc<Shared>);

impl Slot {
    fn take(shared: &Arc<Shared>) -> Option<Arc<Slot>> {
        let max = shared.limits.max_connections;
        shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Arc::new(Slot(Arc::clone(shared))))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts an answer from the moment the control loop gives it until it is written (or
/// its connection is gone), for [`HttpServer::wait_idle`].
#[derive(Debug)]
struct Answering(Arc<Shared>);

impl Answering {
    fn new(shared: &Arc<Shared>) -> Self {
        *shared
            .answering
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        Answering(Arc::clone(shared))
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let mut n = self
            .0
            .answering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The control loop's answer on its way back to the connection thread.
#[derive(Debug)]
struct Answer {
    result: ApiResult,
    _answering: Option<Answering>,
}

/// Where the control loop sends its single answer to one API request, and how it tells
/// whether anybody still waits for it.
#[derive(Debug)]
pub struct Reply {
    tx: Sender<Answer>,
    /// The connection the request came on (a duplicate of its fd) and its slot; `None`
    /// when the request did not come from a client that can hang up.
    client: Option<(UnixStream, Arc<Slot>)>,
}

impl Reply {
    /// Sends the answer. `Err` gives it back when nobody waits for it any more.
    pub fn send(&self, result: ApiResult) -> Result<(), ApiResult> {
        let answering = self
            .client
            .as_ref()
            .map(|(_, slot)| Answering::new(&slot.0));
        self.tx
            .send(Answer {
                result,
                _answering: answering,
            })
            .map_err(|e| e.0.result)
    }

    /// True when the client hung up (or the server gave up on it with a 504) while the
    /// request waited for the control loop: the control loop then drops the request
    /// without running it, and says so in the log and the event monitor. A client that
    /// only shut down its sending side still waits for the answer, so only a full hang-up
    /// (POLLHUP) counts.
    pub fn abandoned(&self, request: &ApiRequest) -> bool {
        let Some((stream, _)) = &self.client else {
            return false;
        };
        if !hung_up(stream) {
            return false;
        }
        log::warn!("API: dropping {request:?}: its client hung up before it could run");
        let mut properties = BTreeMap::new();
        properties.insert("request".to_string(), format!("{request:?}"));
        event_monitor::event(Event::ApiRequestDropped, Some(&properties));
        true
    }
}

/// Whether the peer of `stream` has closed its end (or the connection was shut down).
/// If the check itself fails the answer is "no": running a request nobody waits for is
/// the lesser harm than dropping one somebody does.
///
/// One `poll` that does not wait: POLLHUP (and POLLERR) are reported whatever is asked
/// for, so it asks for nothing. Not POLLRDHUP: that also fires when the client only shut
/// down its sending side, and such a client still waits for its answer.
fn hung_up(stream: &UnixStream) -> bool {
    match crate::sys::socket::poll_one(stream, 0, Duration::ZERO) {
        Ok(revents) => revents & (libc::POLLHUP | libc::POLLERR) != 0,
        Err(e) => {
            log::debug!("API: cannot check whether a client is still connected: {e}");
            false
        }
    }
}

fn serve(listener: &UnixListener, shared: &Arc<Shared>) {
    // Connection threads start from this one and inherit its filter.
    crate::seccomp::enter(crate::seccomp::ThreadKind::HttpApi);
    let mut refused = VecDeque::new();
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let Some(slot) = Slot::take(shared) else {
                    refuse(stream, shared.limits.max_connections, &mut refused);
                    continue;
                };
                let spawned = thread::Builder::new()
                    .name("http-conn".to_string())
                    .stack_size(CONNECTION_STACK)
                    .spawn(move || handle_connection(stream, &slot));
                if let Err(e) = spawned {
                    // The closure (and with it the stream and slot) is dropped: the
                    // client sees the connection close.
                    log::warn!("API socket: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                log::warn!("API socket: accept failed: {e}");
                // Out of fds and similar: don't spin at 100% CPU while it lasts.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connections refused at the cap, kept open for a while: only their sending side is
/// shut down, so a client that writes its request after we answered gets no EPIPE and
/// still reads the 503. The oldest is closed when a new one comes: at most this many
/// fds are held.
const REFUSED_KEPT: usize = 16;

/// Answers a connection beyond the cap with 503 without blocking the acceptor: the
/// socket is non-blocking, and a fresh connection's send buffer takes the short answer.
fn refuse(mut stream: UnixStream, max: usize, kept: &mut VecDeque<UnixStream>) {
    log::warn!("API socket: refusing a connection, {max} are already open");
    let response = error_response(
        503,
        &[format!(
            "the API serves at most {max} connections at once and all are taken (open, or \
             waiting for the VMM); try again later, or raise max_connections in \
             --api-socket"
        )],
    );
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = write_response(&mut stream, &response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if kept.len() >= REFUSED_KEPT
        && let Some(mut old) = kept.pop_front()
    {
        drain(&mut old);
    }
    kept.push_back(stream);
}

/// Reads what a client sent and we will never use: closing a UNIX socket with unread
/// data makes the client's next read fail with ECONNRESET instead of seeing the end.
fn drain(stream: &mut UnixStream) {
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
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

fn handle_connection(mut stream: UnixStream, slot: &Arc<Slot>) {
    let limits = slot.0.limits;
    let deadline = Instant::now() + limits.request_timeout;
    let (response, _answering) = match read_request(&mut stream, deadline, limits.request_timeout) {
        Ok(Some(request)) => respond(&request, &stream, slot),
        // Connected and closed without a word: e.g. another VMM probing the socket.
        Ok(None) => return,
        Err(reject) => (error_response(reject.status, &[reject.message]), None),
    };
    let written = stream
        .set_write_timeout(Some(limits.request_timeout))
        .and_then(|()| write_response(&mut stream, &response));
    if let Err(e) = written {
        log::debug!("API socket: cannot write the response: {e}");
    }
    // A rejected request may be partly unread.
    if stream.set_nonblocking(true).is_ok() {
        drain(&mut stream);
    }
    // The control loop may hold a duplicate of this fd: shutting the connection down
    // (not just closing our fd) tells it nobody waits for an answer any more.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Reads one request; all of it must arrive by `deadline`.
fn read_request(
    stream: &mut UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<Request>, Reject> {
    let io_error = |e: io::Error| Reject::new(400, format!("cannot read the request: {e}"));
    let too_slow = || {
        Reject::new(
            408,
            format!(
                "the request did not arrive within {}s (request_timeout_s)",
                timeout.as_secs()
            ),
        )
    };
    let mut parser = RequestParser::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        stream.set_read_timeout(Some(left)).map_err(io_error)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(too_slow());
            }
            Err(e) => return Err(io_error(e)),
        };
        if n == 0 {
            return parser.finish();
        }
        match parser.feed(&chunk[..n])? {
            ParseStep::NeedMore => {}
            ParseStep::SendContinue => {
                stream
                    .set_write_timeout(Some(left))
                    .and_then(|()| stream.write_all(b"HTTP/1.1 100 \r\n\r\n"))
                    .map_err(io_error)?;
            }
            ParseStep::Complete(request) => return Ok(Some(request)),
        }
    }
}

fn respond(
    request: &Request,
    stream: &UnixStream,
    slot: &Arc<Slot>,
) -> (HttpResponse, Option<Answering>) {
    let route = match routes::find(&request.method, &request.path) {
        Ok(route) => route,
        Err(RouteError::NotFound) => {
            return (
                error_response(404, &[format!("no endpoint {}", request.path)]),
                None,
            );
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
            return (response, None);
        }
    };
    let api_request = match (route.handler)(&request.body) {
        Ok(api_request) => api_request,
        Err(e) => return (api_response(Err(e)), None),
    };
    let reply_timeout = slot.0.limits.reply_timeout;
    let timeout = (!api_request.is_long_running()).then_some(reply_timeout);
    match call_vmm(api_request, stream, slot, timeout) {
        Ok((response, answering)) => (api_response(Ok(response)), answering),
        Err(CallError::Api(e, answering)) => (api_response(Err(e)), answering),
        Err(CallError::Timeout) => (
            error_response(
                504,
                &[format!(
                    "the VMM did not answer {} within {}s (reply_timeout_s); it may be busy \
                     with an earlier request",
                    route.endpoint,
                    reply_timeout.as_secs_f64()
                )],
            ),
            None,
        ),
    }
}

enum CallError {
    Api(ApiError, Option<Answering>),
    Timeout,
}

/// Sends `request` to the control loop and waits for its single answer.
fn call_vmm(
    request: ApiRequest,
    stream: &UnixStream,
    slot: &Arc<Slot>,
    reply_timeout: Option<Duration>,
) -> Result<(ApiResponse, Option<Answering>), CallError> {
    let (tx, answer) = mpsc::channel();
    let client = match stream.try_clone() {
        Ok(dup) => Some((dup, Arc::clone(slot))),
        Err(e) => {
            log::debug!("API socket: cannot duplicate the connection: {e}");
            None
        }
    };
    let reply = Reply { tx, client };
    let gone = || CallError::Api(ApiError::VmmGone, None);
    if !slot.0.vmm.send(ApiCall { request, reply }) {
        return Err(gone());
    }
    let answer = match reply_timeout {
        None => answer.recv().map_err(|_| gone())?,
        Some(timeout) => match answer.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => return Err(CallError::Timeout),
            Err(RecvTimeoutError::Disconnected) => return Err(gone()),
        },
    };
    match answer.result {
        Ok(response) => Ok((response, answer._answering)),
        Err(e) => Err(CallError::Api(e, answer._answering)),
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
        Err(e) => return error_response(status(&e), &e.chain()),
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
        // As Cloud Hypervisor answers vm.info without a VM; scripts test for it.
        ApiError::NoVm => 404,
        ApiError::InvalidState { .. } | ApiError::Conflict(_) => 409,
        ApiError::Internal { .. } => 500,
        ApiError::VmmGone => 503,
    }
}

/// An error answer: the chain as a JSON array of strings, outermost first.
fn error_response(status: u16, chain: &[String]) -> HttpResponse {
    let body = serde_json::Value::from(chain.to_vec());
    HttpResponse {
        status,
        body: Some(body.to_string()),
        allow: None,
    }
}

fn write_response(stream: &mut impl Write, response: &HttpResponse) -> io::Result<()> {
    // An empty reason phrase, as Cloud Hypervisor's server writes it: its ch-remote takes
    // everything up to the `\r` as the code.
    let mut out = format!(
        "HTTP/1.1 {} \r\nServer: Cloud Hypervisor API\r\nConnection: close\r\n",
        response.status
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
    use crate::api::parser::{MAX_BODY_BYTES, MAX_HEAD_BYTES};
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
        let off = ConsoleConfig::mode(ConsoleOutputMode::Off);
        VmConfig {
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
            memory: MemoryConfig::with_size(1 << 20),
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
    fn fake_vmm() -> Notifier<ApiCall> {
        let (tx, rx) = mpsc::channel::<ApiCall>();
        thread::spawn(move || {
            for ApiCall { request, reply } in rx {
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
                        reason: "KVM said no".into(),
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
        Notifier::new(tx)
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
        assert!(text.starts_with("HTTP/1.1 204 \r\n"), "{text}");
        assert!(!text.contains("Content-Length"), "{text}");
    }

    #[test]
    fn api_errors_map_to_statuses_with_chain() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.pause", None);
        assert_eq!(resp.status, 409);
        assert_eq!(
            error_json(&resp),
            serde_json::json!(["cannot pause a VM that is Paused"])
        );

        assert_eq!(call(&sock, "PUT", "vmm.shutdown", None).status, 404);
        let resp = call(&sock, "PUT", "vm.shutdown", None);
        assert_eq!(resp.status, 500);
        assert_eq!(
            error_json(&resp),
            serde_json::json!(["shutdown failed", "KVM said no"])
        );
    }

    #[test]
    fn status_mapping() {
        assert_eq!(status(&ApiError::BadRequest("x".into())), 400);
        assert_eq!(
            status(&ApiError::InvalidState {
                action: "pause",
                state: VmState::Created
            }),
            409
        );
        assert_eq!(status(&ApiError::NoVm), 404);
        assert_eq!(
            status(&ApiError::Internal {
                action: "x",
                reason: "x".into()
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
        assert_eq!(
            error_json(&resp),
            serde_json::json!(["no endpoint /api/v1/vm.nothing"])
        );
        assert_eq!(call(&sock, "GET", "/vm.info", None).status, 404);
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let sock = server();
        let resp = call(&sock, "PUT", "vm.info", None);
        assert_eq!(resp.status, 405);
        assert!(resp.error_message().contains("allowed: GET"));
        let text = raw(&sock, b"DELETE /api/v1/vm.pause HTTP/1.1\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 405 \r\n"), "{text}");
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
        let mut buf = [0u8; 17];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 \r\n\r\n");
        s.write_all(b"{}").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 204 "), "{out}");
    }

    #[test]
    fn vmm_gone_is_503() {
        let path = temp_socket();
        let (tx, rx) = mpsc::channel::<ApiCall>();
        drop(rx);
        start_http_server(&path, Notifier::new(tx)).unwrap();
        let resp = call(&path, "GET", "vmm.ping", None);
        assert_eq!(resp.status, 503);
        assert_eq!(resp.error_message(), "the VMM is shutting down");
    }

    #[test]
    fn silent_vmm_is_504() {
        let path = temp_socket();
        let (tx, rx) = mpsc::channel::<ApiCall>();
        // Holds the requests (and their reply senders) without answering.
        let hoarder = thread::spawn(move || rx.iter().collect::<Vec<_>>());
        let limits = ApiLimits {
            reply_timeout: Duration::from_millis(50),
            ..ApiLimits::default()
        };
        spawn_http_server(&path, Notifier::new(tx), limits).unwrap();
        let resp = call(&path, "GET", "vm.info", None);
        assert_eq!(resp.status, 504);
        assert!(resp.error_message().contains("did not answer vm.info"));
        drop(hoarder);
    }

    #[test]
    fn wait_idle_returns_after_served_requests() {
        let path = temp_socket();
        let server = spawn_http_server(&path, fake_vmm(), ApiLimits::default()).unwrap();
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

    fn server_with(limits: ApiLimits, vmm: Notifier<ApiCall>) -> TempSocket {
        let path = temp_socket();
        spawn_http_server(&path, vmm, limits).unwrap();
        path
    }

    #[test]
    fn idle_clients_do_not_block_and_the_cap_refuses_cleanly() {
        let limits = ApiLimits {
            max_connections: 3,
            ..ApiLimits::default()
        };
        let sock = server_with(limits, fake_vmm());
        let idle: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&*sock).unwrap())
            .collect();
        let start = Instant::now();
        assert_eq!(call(&sock, "GET", "vmm.ping", None).status, 200);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );

        let third = UnixStream::connect(&*sock).unwrap();
        let resp = call(&sock, "GET", "vmm.ping", None);
        assert_eq!(resp.status, 503, "{resp:?}");
        assert!(
            resp.error_message().contains("at most 3 connections"),
            "{resp:?}"
        );
        drop(third);
        drop(idle);
        // The slots free as soon as the connection threads see the hang-ups.
        let deadline = Instant::now() + Duration::from_secs(5);
        while call(&sock, "GET", "vmm.ping", None).status != 200 {
            assert!(Instant::now() < deadline, "the slots never freed");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_whole_request_has_a_deadline() {
        let limits = ApiLimits {
            request_timeout: Duration::from_millis(300),
            ..ApiLimits::default()
        };
        let sock = server_with(limits, fake_vmm());
        let mut s = UnixStream::connect(&*sock).unwrap();
        let start = Instant::now();
        // One byte every 50 ms: no single read waits long, the whole does.
        for b in b"GET /api/v1/vmm.ping HTTP/1.1\r\n".iter() {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    /// A control loop busy with a first request; the second request's client hangs up
    /// while it waits, and the loop must not run it.
    #[test]
    fn a_request_whose_client_left_is_not_run() {
        let (tx, rx) = mpsc::channel::<ApiCall>();
        let (busy_tx, busy_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (ran_tx, ran_rx) = mpsc::channel::<(ApiRequest, bool)>();
        thread::spawn(move || {
            for ApiCall { request, reply } in rx {
                if request == ApiRequest::VmResume {
                    let _ = busy_tx.send(());
                    let _ = release_rx.recv();
                }
                let abandoned = reply.abandoned(&request);
                let _ = ran_tx.send((request, abandoned));
                let _ = reply.send(Ok(ApiResponse::Empty));
            }
        });
        let sock = server_with(ApiLimits::default(), Notifier::new(tx));
        let busy = {
            let sock = sock.0.clone();
            thread::spawn(move || call(&sock, "PUT", "vm.resume", None))
        };
        busy_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // The loop is busy: whenever the server queues this request, the client has
        // hung up before the loop gets to it.
        let mut quitter = UnixStream::connect(&*sock).unwrap();
        quitter
            .write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        drop(quitter);
        release_tx.send(()).unwrap();
        assert_eq!(busy.join().unwrap().status, 204);
        let first = ran_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, (ApiRequest::VmResume, false));
        let second = ran_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(second, (ApiRequest::VmPause, true));
    }

    /// Connection threads have a small stack: deeply nested bodies must not overflow it.
    #[test]
    fn deeply_nested_bodies_are_400_on_a_small_stack() {
        let sock = server();
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for route in routes::ROUTES {
            let body = format!("{{\"destination_url\":{nested},\"x\":{nested}}}");
            let resp = call(&sock, route.method.as_str(), route.endpoint, Some(&body));
            assert_eq!(resp.status, 400, "{}: {resp:?}", route.endpoint);
            let resp = call(&sock, route.method.as_str(), route.endpoint, Some(&nested));
            assert_eq!(resp.status, 400, "{}: {resp:?}", route.endpoint);
        }
        assert_eq!(call(&sock, "GET", "vmm.ping", None).status, 200);
    }
}
