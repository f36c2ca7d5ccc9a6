//! Lock-step requests on a connection to the destination, and what a failed one means.

use std::time::Duration;

use vm_migration::{RequestHeader, expect_ok, send_request};

use super::{Error, Result};
use crate::net::{Stream, is_timeout};

/// What went wrong talking to the destination about `what`: it said no, it went
/// silent for `timeout`, or the connection failed.
pub(super) fn peer_error(
    timeout: Duration,
    what: &'static str,
    answer: bool,
    e: vm_migration::Error,
) -> Error {
    if matches!(e, vm_migration::Error::NotOk(_)) {
        Error::Refused(what)
    } else if is_timeout(&e) {
        Error::Stalled {
            what,
            answer,
            timeout,
        }
    } else {
        Error::Peer {
            what,
            answer,
            source: e,
        }
    }
}

pub(super) fn send_step(
    stream: &mut Stream,
    timeout: Duration,
    what: &'static str,
    header: &RequestHeader,
    payload: &[u8],
) -> Result<()> {
    send_request(stream, header, payload).map_err(|e| peer_error(timeout, what, false, e))
}

pub(super) fn answer_step(
    stream: &mut Stream,
    timeout: Duration,
    what: &'static str,
) -> Result<()> {
    expect_ok(stream).map_err(|e| peer_error(timeout, what, true, e))
}

/// One lock-step request on the main connection: send it, wait for its Ok.
pub(super) fn exchange(
    stream: &mut Stream,
    timeout: Duration,
    what: &'static str,
    header: &RequestHeader,
    payload: &[u8],
) -> Result<()> {
    send_step(stream, timeout, what, header, payload)?;
    answer_step(stream, timeout, what)
}
