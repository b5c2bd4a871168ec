//! Where the library's messages go: `tracing` records (loading progress at info, fallbacks and
//! failures that cost speed at warn), which the host's subscriber formats and filters.
//!
//! Hosts without a subscriber of their own — a TouchDesigner plugin through the C ABI, a
//! notebook through the Python module — still see them: the bindings call
//! [`to_stderr_unless_subscribed`] when their first handle is made, which sends them to stderr
//! once per process, filtered by `SDSTREAM_LOG` or `RUST_LOG` (`tracing_subscriber`'s filter
//! syntax; default `sdstream=info,warn`), as the server does. A host that installed its own
//! subscriber first keeps it.

/// The progress lines of a load (`loading unet from …`, `loaded unet in 0.4 s`), as the
/// loaders' `progress` callbacks receive them, logged at info.
pub fn progress(line: &str) {
    tracing::info!(target: "sdstream::load", "{line}");
}

/// The variables that filter the records sent to stderr by [`to_stderr_unless_subscribed`],
/// the first one set (and not blank) taken: `tracing_subscriber`'s filter syntax.
pub const LOG_FILTER_VARS: [&str; 2] = ["SDSTREAM_LOG", "RUST_LOG"];

/// The filter used when no [`LOG_FILTER_VARS`] is set, or the one set is invalid.
pub const DEFAULT_LOG_FILTER: &str = "sdstream=info,warn";

/// Sends log records to stderr, once per process, unless a global tracing subscriber is
/// already set (see the module documentation). The server's CLI, the C ABI and the Python
/// module all start their logs here.
#[cfg(feature = "stderr-log")]
pub fn to_stderr_unless_subscribed() {
    use tracing_subscriber::EnvFilter;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if tracing::dispatcher::has_been_set() {
            return;
        }
        let wanted = LOG_FILTER_VARS
            .into_iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.into());
        let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
            // No logger yet to say it with.
            eprintln!("log filter {wanted:?}: {e}; using {DEFAULT_LOG_FILTER}");
            EnvFilter::new(DEFAULT_LOG_FILTER)
        });
        // Another thread may have set one since: then theirs stays.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    });
}
