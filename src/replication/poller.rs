//! Without Redis: poll Synapse's stream tables on a short interval. Rows of
//! a multi-writer stream can commit out of id order, so each poll re-reads
//! a window below the newest id seen and skips rows already applied.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::Follower;
use super::Invalidator;

/// How far below the newest id seen each poll looks again.
const WINDOW: i64 = 200;

pub async fn run(app: Arc<Follower>, inv: Arc<Invalidator>) {
    let every = Duration::from_millis(app.config.worker.poll_interval_ms.max(50));
    let mut heads: Option<(i64, i64)> = None;
    let mut seen_users: HashSet<(i64, String)> = HashSet::new();
    let mut seen_caches: HashSet<i64> = HashSet::new();
    loop {
        match poll(&app, &inv, &mut heads, &mut seen_users, &mut seen_caches).await {
            Ok(()) => {
                app.status.set_connected();
                app.status.set_caught_up();
                app.caches.set_trusted(true);
            }
            Err(e) => {
                tracing::warn!(error = %e, "polling the stream tables failed; caches off");
                app.caches.set_trusted(false);
                app.invalidator.everything();
                app.status.set_lost();
                heads = None;
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn poll(
    app: &Follower,
    inv: &Invalidator,
    heads: &mut Option<(i64, i64)>,
    seen_users: &mut HashSet<(i64, String)>,
    seen_caches: &mut HashSet<i64>,
) -> Result<(), sqlx::Error> {
    let (dl_head, cache_head) = app.store.stream_heads().await?;
    let Some((dl_last, cache_last)) = *heads else {
        // First poll (or after an error, with the caches emptied): start here.
        *heads = Some((dl_head, cache_head));
        return Ok(());
    };
    for row in app.store.device_list_changes(dl_last - WINDOW, dl_head, None).await? {
        if seen_users.insert((row.stream_id, row.user_id.clone())) {
            inv.user_changed(&row.user_id);
        }
    }
    for row in app.store.cache_invalidations(cache_last - WINDOW, cache_head, None).await? {
        if seen_caches.insert(row.stream_id) {
            inv.synapse_cache(&row.cache_func, row.keys.as_deref());
        }
    }
    seen_users.retain(|(id, _)| *id > dl_head - 2 * WINDOW);
    seen_caches.retain(|id| *id > cache_head - 2 * WINDOW);
    *heads = Some((dl_head.max(dl_last), cache_head.max(cache_last)));
    Ok(())
}
