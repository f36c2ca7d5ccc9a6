//! Feeds arbitrary bytes to every decoder of `vm-migration` (headers, range tables, roles,
//! PageFault bodies and responses, whole requests read from a cursor). The harness lives in
//! the crate (`vm_migration::fuzzing`) so its unit test runs the same code on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vm_migration::fuzzing::decode_everything(data);
});
