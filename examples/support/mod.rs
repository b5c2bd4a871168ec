//! What the example programs share: the test fixtures' location, `--flag value` arguments, the
//! benches' `--device` and their median/best timing.
//! Each example includes it with `#[path = "support/mod.rs"] mod support;` (examples are
//! separate binaries, so this is the one copy of these helpers, not a library API).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

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

/// The device a bench's `--device` names: `cpu` or `cuda` (the first GPU).
pub fn device(name: &str) -> Result<candle_core::Device, String> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => candle_core::Device::new_cuda(0).map_err(|e| format!("--device cuda: {e}")),
        other => Err(format!("--device {other}: cpu or cuda")),
    }
}

/// Runs `f` once to warm up, then `runs` times: the median and the best duration.
pub fn median_and_best(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    let mut t: Vec<Duration> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    (t[t.len() / 2], t[0])
}
