//! Arbitrary bytes as one client connection to the agent's HTTP server (management API,
//! upgrades, `/healthz`, `/metrics`): the agent never panics, answers only in HTTP, and never
//! more than a bounded amount.
//!
//! The agent's token is `immortal::server::fuzzing::TOKEN`; the seed corpus
//! (`fuzz/corpus/http_request/seed-*`) holds requests that carry it, so the fuzzer starts
//! inside the authenticated routes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = immortal::server::fuzzing::http_exchange(data);
    if !answer.is_empty() {
        assert!(
            answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
});
