//! Drift nobody has to look for.
//!
//! - The signals that need no federation request are read every minute,
//!   always: Synapse's stale marks and the age of the oldest, remote users
//!   still tracked who share no room with us, local devices without their
//!   owner's self-signing signature.
//! - With `keys_worker.device_list_audit.enabled`, the auditor checks, every
//!   `interval_ms`, up to `users_per_interval` tracked remote users who
//!   share a room with us against their server's `GET /user/devices`: in a
//!   rotation over servers (each round starts with the server after the
//!   last one of the round before, and each server goes on from its last
//!   user), at most `per_destination_per_interval` users of any server a
//!   round, skipping servers Synapse or we are backing off from. A server
//!   that fails stops being asked for the rest of the round, so a hanging
//!   one costs a round one timeout. Drift is confirmed by reading Synapse's
//!   copy again a few seconds later (an update may have been on its way),
//!   then counted, and with `repair` repaired as the admin API does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::inspect::synapse_view;
use super::repair;
use super::stats::{CheckOutcome, Trigger};
use super::view::ListView;
use crate::App;

/// How often the signals are read.
const SIGNALS_EVERY: Duration = Duration::from_secs(60);
/// How long drift must last to count: an update may have been on its way.
const CONFIRM_AFTER: Duration = Duration::from_secs(3);

/// Starts reading the signals, and the auditor when it is on.
pub fn start(app: Arc<App>) {
    if app.config.worker.device_list_audit.enabled {
        tokio::spawn(audit(Arc::clone(&app)));
    }
    tokio::spawn(signals(app));
}

async fn signals(app: Arc<App>) {
    let mut every = tokio::time::interval(SIGNALS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match app.store.health_signals().await {
            Ok(s) => app.device_list_stats.set_signals(s),
            Err(e) => tracing::warn!(error = %e, "device-list signals not read (their metrics are left out until they are)"),
        }
    }
}

/// Where the rotation stands.
#[derive(Debug, Default)]
struct Rotation {
    /// The last server of the previous round.
    server: String,
    /// Per server, the last user checked.
    users: HashMap<String, String>,
}

async fn audit(app: Arc<App>) {
    let cfg = &app.config.worker.device_list_audit;
    tracing::info!(
        every_ms = cfg.interval_ms,
        users = cfg.users_per_interval,
        per_server = cfg.per_destination_per_interval,
        repair = cfg.repair,
        "device-list auditor on"
    );
    let mut every = tokio::time::interval(Duration::from_millis(cfg.interval_ms.max(1000)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rotation = Rotation::default();
    loop {
        every.tick().await;
        if let Err(e) = round(&app, &mut rotation).await {
            tracing::warn!(error = %e, "device-list audit round failed");
        }
        app.device_list_stats.rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One round: pick the users, check each server's in turn, servers side by
/// side.
async fn round(app: &App, rotation: &mut Rotation) -> Result<(), sqlx::Error> {
    let cfg = &app.config.worker.device_list_audit;
    let per_server = i64::from(cfg.per_destination_per_interval.max(1));
    let mut budget = i64::from(cfg.users_per_interval);
    let servers = next_servers(app, &rotation.server, (budget + per_server - 1) / per_server).await?;
    let Some(last) = servers.last() else { return Ok(()) };
    rotation.server = last.clone();
    let refs: Vec<&str> = servers.iter().map(String::as_str).collect();
    let synapse_backoff = app.store.destinations_in_backoff(&refs, crate::now_ms()).await?;
    let mut picks: Vec<(String, Vec<String>)> = Vec::new();
    for server in servers {
        if budget <= 0 {
            break;
        }
        if synapse_backoff.contains(&server) || app.remote.federation.backing_off(&server).is_some() {
            app.device_list_stats.skipped_backoff.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let after = rotation.users.get(&server).cloned().unwrap_or_default();
        let mut users = app.store.audited_users_of(&server, &after, per_server.min(budget)).await?;
        if users.is_empty() && !after.is_empty() {
            users = app.store.audited_users_of(&server, "", per_server.min(budget)).await?;
        }
        let Some(last) = users.last() else { continue };
        rotation.users.insert(server.clone(), last.clone());
        budget -= i64::try_from(users.len()).unwrap_or(i64::MAX);
        picks.push((server, users));
    }
    let timeout = Duration::from_millis(app.config.worker.default_timeout_ms);
    let servers = picks.into_iter().map(|(server, users)| async move {
        for user in users {
            if check(app, &server, &user, timeout).await == CheckOutcome::Failed {
                break;
            }
        }
    });
    futures::stream::iter(servers).buffer_unordered(app.config.worker.federation_concurrency.max(1)).collect::<()>().await;
    Ok(())
}

/// Up to `limit` servers after `after` in name order, wrapping around.
async fn next_servers(app: &App, after: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
    let mut servers = app.store.audited_servers(after, limit).await?;
    let short = limit - i64::try_from(servers.len()).unwrap_or(limit);
    if short > 0 && !after.is_empty() {
        for s in app.store.audited_servers("", short).await? {
            if !servers.contains(&s) {
                servers.push(s);
            }
        }
    }
    Ok(servers)
}

/// Checks one user's list against their server's answer.
async fn check(app: &App, server: &str, user: &str, timeout: Duration) -> CheckOutcome {
    let outcome = check_once(app, server, user, timeout).await.unwrap_or_else(|e| {
        tracing::debug!(error = %e, user, "device-list check not made");
        CheckOutcome::Failed
    });
    app.device_list_stats.checked(outcome);
    outcome
}

async fn check_once(app: &App, server: &str, user: &str, timeout: Duration) -> Result<CheckOutcome, super::HealthError> {
    let answer = match app.remote.federation.user_devices(server, user, timeout).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::info!(error = %e, server, "device-list audit: the server failed; skipping it this round");
            return Ok(CheckOutcome::Failed);
        }
    };
    let Ok(truth) = ListView::remote_answer(user, &answer) else { return Ok(CheckOutcome::Failed) };
    let state = app.store.remote_list_state(user).await?;
    if state.stale_since_ts.is_some() {
        return Ok(CheckOutcome::AlreadyStale);
    }
    if !synapse_view(app, user, state.stream_id.as_deref()).await?.drift_from(&truth).any() {
        return Ok(CheckOutcome::InSync);
    }
    tokio::time::sleep(CONFIRM_AFTER).await;
    let state = app.store.remote_list_state(user).await?;
    let drift = synapse_view(app, user, state.stream_id.as_deref()).await?.drift_from(&truth);
    if !drift.any() || state.stale_since_ts.is_some() {
        return Ok(if drift.any() { CheckOutcome::AlreadyStale } else { CheckOutcome::InSync });
    }
    app.device_list_stats.drift_found(&drift);
    tracing::warn!(user, ?drift, "device-list audit: Synapse's copy differs from the server's");
    if app.config.worker.device_list_audit.repair {
        match repair(app, user, timeout, Trigger::Auditor).await {
            Ok(r) => tracing::info!(user, repaired = r.repaired, error = r.error, "device-list audit: repaired"),
            Err(e) => tracing::warn!(user, error = %e, "device-list audit: repair failed"),
        }
    }
    Ok(CheckOutcome::Drifted)
}
