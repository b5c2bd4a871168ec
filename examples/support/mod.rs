//! What the example programs share: the test fixtures' location and `--flag value` arguments.
//! Each example includes it with `#[path = "support/mod.rs"] mod support;` (examples are
//! separate binaries, so this is the one copy of these helpers, not a library API).
#![allow(dead_code)]

use std::path::PathBuf;

/// `tests/fixtures/<rel>` of this repository, as a string (the tiny test checkpoints).
pub fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

/// The command line as `(flag, value)` pairs. `-h` / `--help` and a flag without a value are
/// errors carrying `usage`, for the caller to print.
pub fn flag_values(usage: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(usage.to_owned());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{usage}"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}

/// Resident set size in KiB, from /proc (Linux); `None` elsewhere.
pub fn rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

/// Anonymous resident memory in KiB (heap and other private allocations: not the program's
/// code or mapped files), from /proc (Linux); `None` elsewhere.
pub fn anon_rss_kib() -> Option<u64> {
    proc_status_kib("RssAnon:")
}

/// Peak resident set size in KiB, from /proc (Linux); `None` elsewhere.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
