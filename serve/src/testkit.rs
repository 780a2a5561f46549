//! A bare HTTP/1.1 client for tests: what a plain client sends, one request
//! per connection, so the tests see exactly the bytes the server answers.
//! Shared by this crate's tests and the `prism` binary's (feature `testkit`).

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;

/// One request to the server at `addr` with `headers` (extra header lines,
/// each ending in `\r\n`); returns the status, the lowercased head and the
/// body, with a chunked body decoded. Panics on a malformed answer.
pub fn request(addr: &str, method: &str, path: &str, body: &str, headers: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"));
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (status, head, body)
}

/// POSTs `body` as JSON; returns the status and the answer parsed as JSON.
pub fn post_json(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = request(addr, "POST", path, &body.to_string(), "");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// The body of a chunked transfer encoding.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap_or_else(|| panic!("no chunk size in {rest:?}"));
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}
