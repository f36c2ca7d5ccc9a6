//! The API's route table and body decoders (`vmm::api::routes`): arbitrary method and
//! path strings, and arbitrary bytes and JSON trees as the body of every route. A
//! handler answers a request or a `BadRequest` naming the problem; it never panics, and
//! never allocates more than a small multiple of its body.

use fuzz_harness::proptest::prelude::*;
use fuzz_harness::{Peak, measure, report};
use vmm::api::ApiError;
use vmm::api::routes::{self, ROUTES};

const CAP: &str = "16 x body + 64 KiB";

use crate::strategies::json;

/// Bodies reach the handlers already capped (1 MiB); the inputs here are far smaller.
fn cap(body: &[u8]) -> usize {
    16 * body.len() + 64 * 1024
}

fn check_all_routes(body: &[u8], peak: &Peak) {
    for route in ROUTES {
        let (result, allocations) = measure(|| (route.handler)(body));
        peak.note(&allocations);
        allocations.assert_within(cap(body), route.endpoint);
        match result {
            Ok(_) => {}
            Err(ApiError::BadRequest(reason)) => {
                assert!(!reason.messages().is_empty() && !reason.to_string().is_empty())
            }
            Err(other) => panic!("{}: a body gave {other:?}, not a 400", route.endpoint),
        }
    }
}

#[test]
fn fuzz_api_bodies_arbitrary_bytes() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(body in prop::collection::vec(any::<u8>(), 0..4096))| {
        check_all_routes(&body, &peak);
    });
    report("api_bodies_arbitrary_bytes", peak.get(), CAP);
}

#[test]
fn fuzz_api_bodies_json() {
    let peak = Peak::default();
    proptest!(fuzz_harness::config(500), |(value in json())| {
        let body = serde_json::to_vec(&value).unwrap();
        check_all_routes(&body, &peak);
    });
    report("api_bodies_json", peak.get(), CAP);
}

#[test]
fn fuzz_api_routes() {
    proptest!(fuzz_harness::config(2000), |(method in "[A-Z]{0,8}|.{0,8}", path in ".{0,64}",
                                            index in 0..ROUTES.len())| {
        let _ = routes::find(&method, &path);
        let route = &ROUTES[index];
        let full = format!("{}{}{}", routes::API_PREFIX, route.endpoint, path);
        let _ = routes::find(route.method.as_str(), &full);
        let exact = format!("{}{}", routes::API_PREFIX, route.endpoint);
        prop_assert!(routes::find(route.method.as_str(), &exact).is_ok(), "{}", exact);
    });
}
