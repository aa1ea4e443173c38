//! Integration tests against real PostgreSQL and a real Synapse, set up by
//! scripts/test.sh. One binary, one module per area.

mod appservice;
mod barrier;
mod bounded;
mod dashboard;
mod demo;
mod device_health;
mod differential;
mod errors;
mod fake_mas;
mod fake_remote;
mod fake_writer;
mod faults;
mod federation;
mod fresh_after_sync;
mod helpers;
mod mas;
mod operations;
mod packaging;
mod redis_settings;
mod remote;
mod remote_fidelity;
mod replication;
mod replication_pass;
mod schema;
mod schema_window;
mod sqlite;
mod tcp_proxy;
mod tooling;
mod variant;
mod workers;
mod writer_proxy;
