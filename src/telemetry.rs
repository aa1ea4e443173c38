//! Logging setup: `RUST_LOG`-style filtering, text or JSON lines.

use tracing_subscriber::EnvFilter;

pub fn init(json: bool) {
    init_with_default(json, "info");
}

/// As [`init`], with `default` as the filter when `RUST_LOG` is unset.
pub fn init_with_default(json: bool, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
