//! The HTTP request parser (`vmm::api::parser`): arbitrary bytes and near-valid
//! requests, split at arbitrary points. It never panics, never buffers past its caps,
//! never allocates more than the head cap plus twice what it was fed (an announced body
//! is not reserved), and a request it completes is the one that was sent.

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use vmm::api::parser::{MAX_BODY_BYTES, MAX_HEAD_BYTES, ParseStep, Request, RequestParser};

const CAP: &str = "max(16 KiB head cap, 2 x input) + 1 KiB";

use crate::strategies::split;

/// The most bytes the parser may hold at once.
const BUFFER_CAP: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES;

/// Feeds every piece; returns the first final outcome and the most bytes held.
fn run(pieces: &[Vec<u8>]) -> (Option<Result<Request, u16>>, usize) {
    let mut parser = RequestParser::new();
    let mut held = 0;
    for piece in pieces {
        let step = parser.feed(piece);
        held = held.max(parser.buffered());
        match step {
            Ok(ParseStep::NeedMore | ParseStep::SendContinue) => {}
            Ok(ParseStep::Complete(r)) => return (Some(Ok(r)), held),
            Err(reject) => {
                assert!(!reject.message.is_empty());
                assert!((400..600).contains(&reject.status), "{reject:?}");
                return (Some(Err(reject.status)), held);
            }
        }
    }
    match parser.finish() {
        Ok(None) => (None, held),
        Ok(Some(r)) => (Some(Ok(r)), held),
        Err(reject) => (Some(Err(reject.status)), held),
    }
}

fn check(pieces: &[Vec<u8>], peak: &Peak) -> Option<Result<Request, u16>> {
    let fed: usize = pieces.iter().map(Vec::len).sum();
    let ((outcome, held), allocations) = measure(|| run(pieces));
    peak.note(&allocations);
    assert!(held <= BUFFER_CAP, "held {held} bytes");
    // The head buffer never passes its cap, the body buffer never passes twice what
    // arrived (nor what was announced): nothing announced is reserved.
    allocations.assert_within(MAX_HEAD_BYTES.max(2 * fed) + 1024, "HTTP parser");
    outcome
}

/// A request from parts that matter to the parser: method, path, a Content-Length that
/// may lie or be huge, other headers, a body.
fn request() -> impl Strategy<Value = (Vec<u8>, Option<usize>, Vec<u8>)> {
    // Heads near and past the head cap, cheap to generate.
    let pad = prop_oneof![Just(0usize), 0..2 * MAX_HEAD_BYTES];
    let method = prop::sample::select(&["GET", "PUT", "POST", "DELETE", "", "G\u{1}T"][..]);
    let path = prop_oneof![
        prop::sample::select(&["/api/v1/vm.info", "/api/v1/vm.pause", "/", "*"][..])
            .prop_map(str::to_string),
        "/[ -~]{0,40}",
    ];
    let length = prop_oneof![
        Just(None),
        (0usize..64).prop_map(Some),
        prop::sample::select(&[MAX_BODY_BYTES, MAX_BODY_BYTES + 1, usize::MAX][..]).prop_map(Some),
    ];
    let extra = prop::collection::vec(
        prop_oneof![
            Just("Expect: 100-continue".to_string()),
            Just("Transfer-Encoding: chunked".to_string()),
            Just("Content-Length: 3".to_string()),
            Just("Content-Length: +3".to_string()),
            "[A-Za-z-]{1,12}: [ -~]{0,20}",
        ],
        0..4,
    );
    let body = prop::collection::vec(any::<u8>(), 0..128);
    (method, path, length, extra, body, pad).prop_map(|(m, p, len, extra, body, pad)| {
        let mut head = format!("{m} {p} HTTP/1.1\r\n");
        if pad > 0 {
            head.push_str(&format!("X-Pad: {}\r\n", "a".repeat(pad)));
        }
        if let Some(len) = len {
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        for h in &extra {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&body);
        // Only a lone, valid Content-Length tells what a completed body must be.
        let plain = extra
            .iter()
            .all(|h| !h.starts_with("Content-Length") && !h.starts_with("Transfer-Encoding"));
        (bytes, len.filter(|_| plain), body)
    })
}

#[test]
fn fuzz_http_parser_arbitrary_bytes() {
    let peak = Peak::default();
    let config = fuzz_harness::config(1000);
    proptest!(config, |(bytes in prop::collection::vec(any::<u8>(), 0..4096),
                        cuts in prop::collection::vec(any::<usize>(), 0..16))| {
        check(&split(bytes, cuts), &peak);
    });
    report("http_parser_arbitrary_bytes", peak.get(), CAP);
}

#[test]
fn fuzz_http_parser_requests() {
    let peak = Peak::default();
    let config = fuzz_harness::config(3000);
    proptest!(config, |((bytes, length, body) in request(),
                        cuts in prop::collection::vec(any::<usize>(), 0..16))| {
        let outcome = check(&split(bytes, cuts), &peak);
        if let (Some(Ok(request)), Some(length)) = (outcome, length) {
            prop_assert_eq!(request.body.len(), length);
            prop_assert_eq!(&request.body[..], &body[..length]);
        }
    });
    report("http_parser_requests", peak.get(), CAP);
}

/// A head announcing the largest body, then a trickle: what is held follows what came.
#[test]
fn fuzz_http_parser_announced_bodies() {
    let peak = Peak::default();
    let config = fuzz_harness::config(500);
    proptest!(config, |(announced in 0..=MAX_BODY_BYTES, sent in 0usize..8192,
                        cuts in prop::collection::vec(any::<usize>(), 0..8))| {
        let mut bytes = format!("PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {announced}\r\n\r\n")
            .into_bytes();
        bytes.resize(bytes.len() + sent, b'x');
        let outcome = check(&split(bytes, cuts), &peak);
        match outcome {
            Some(Ok(r)) => prop_assert_eq!(r.body.len(), announced),
            Some(Err(status)) => prop_assert_eq!(status, 400),
            None => prop_assert!(false, "a request was sent"),
        }
    });
    report("http_parser_announced_bodies", peak.get(), CAP);
}
