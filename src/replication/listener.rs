//! The Redis side: subscribe to the channel named after `server_name`,
//! publish `REPLICATE` so every writer reports its position, apply `RDATA`
//! rows as they come, and read rows we missed from the database. Reconnects
//! with backoff; never crashes the process.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::Follower;
use super::Invalidator;
use super::protocol::{self, Command};

/// How long after `REPLICATE` we wait for the writers' positions. Writers
/// answer in milliseconds; a busy one may take seconds, and until every
/// writer has answered (or this has passed) reads go to the database, which
/// is slower but never stale. A writer silent this long is taken for gone:
/// everything cached is dropped instead of caught up.
const SETTLE: Duration = Duration::from_secs(10);
/// The subscription's own connection is pinged this often, and must answer
/// within [`PING_WITHIN`]: a subscription that stops delivering while its
/// TCP connection stays open (an idle timeout on a quiet channel, a
/// half-open socket) is found within their sum, and the session ends
/// (caches bypassed, then a new subscription and a catch-up).
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_WITHIN: Duration = Duration::from_secs(3);
const STREAMS: [&str; 2] = ["device_lists", "caches"];

pub async fn run(app: Arc<Follower>, invalidator: Arc<Invalidator>, client: redis::Client) {
    let mut positions = Positions::default();
    let mut delay = Duration::from_millis(250);
    loop {
        let connected_at = Instant::now();
        if let Err(e) = session(&app, &invalidator, &client, &mut positions).await {
            tracing::warn!(error = %e, "replication stream lost; caches off until it is back");
        }
        app.caches.set_trusted(false);
        app.status.set_lost();
        app.status.count_reconnect();
        if connected_at.elapsed() > Duration::from_secs(30) {
            delay = Duration::from_millis(250);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn session(app: &Follower, inv: &Invalidator, client: &redis::Client, positions: &mut Positions) -> anyhow::Result<()> {
    let channel = app.config.synapse.server_name.clone();
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        let conn = client.get_multiplexed_async_connection().await?;
        anyhow::Ok((pubsub, conn))
    };
    let (pubsub, mut conn) = tokio::time::timeout(Duration::from_secs(5), connect).await??;
    // Commands go to the subscription's own connection (its sink), so that
    // their answers prove that connection delivers.
    let (mut sink, mut messages) = pubsub.split();
    // Subscribed first, so nothing published from here on is missed; then
    // ask every writer for its position.
    let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg("REPLICATE ").query_async(&mut conn).await?;
    app.status.set_connected();
    tracing::info!(channel, "following Synapse's replication stream");

    // Positions known before this session: a writer whose position we did
    // not know may have written while we were away, and every writer we
    // knew must report again (each is caught up on its own) before the
    // caches are trusted.
    let reconnecting = positions.begin_session();
    let mut awaited = Awaited::new(&positions.known, &app.config.synapse.device_lists_writers);
    let settle_by = Instant::now() + SETTLE;
    let mut settled = false;
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { anyhow::bail!("subscription closed") };
                app.status.touch();
                let line: String = msg.get_payload().unwrap_or_default();
                match protocol::parse(&line) {
                    Command::Rdata { stream, instance, token, row } => {
                        apply_row(inv, &stream, &row);
                        if let (Some(t), true) = (token, STREAMS.contains(&stream.as_str()))
                            && positions.rdata((stream.clone(), instance.clone()), t)
                            && stream == "device_lists"
                        {
                            app.status.reported.report(&instance, t);
                        }
                    }
                    Command::Position { stream, instance, prev, new } if STREAMS.contains(&stream.as_str()) => {
                        awaited.reported(&stream, &instance);
                        let key = (stream, instance);
                        let step = positions.position(key.clone(), prev, new, reconnecting);
                        follow_step(app, inv, &key, step).await;
                        // Everything up to it is applied now (or dropped).
                        if key.0 == "device_lists" {
                            app.status.reported.report(&key.1, new);
                        }
                    }
                    _ => {}
                }
                if !settled && awaited.done() {
                    settled = true;
                    trust(app);
                }
            }
            _ = tokio::time::sleep_until(settle_by), if !settled => {
                settled = true;
                if reconnecting && !awaited.done() {
                    // Some stream or writer never reported: we cannot tell
                    // what it wrote while we were away. Nothing cached is
                    // kept, and a silent writer is forgotten (should it
                    // speak again, it is one we did not follow).
                    tracing::warn!(silent = ?awaited.silent(), "not every writer reported its position; dropping all cached entries");
                    app.invalidator.everything();
                    app.status.count_dropped_all();
                    for key in awaited.silent() {
                        positions.forget(&key);
                    }
                }
                trust(app);
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_WITHIN, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => app.status.touch(),
                    Ok(Err(e)) => anyhow::bail!("the subscription's connection failed a PING: {e}"),
                    Err(_) => anyhow::bail!("the subscription's connection did not answer a PING within {PING_WITHIN:?}"),
                }
            }
        }
    }
}

/// Who has yet to report a position after `REPLICATE`: every stream we
/// follow, every device-list writer the config names (so that their
/// positions are known before the first gap, however slowly they answer),
/// and every writer whose position we knew before this session.
struct Awaited {
    streams: Vec<&'static str>,
    writers: HashSet<(String, String)>,
}

impl Awaited {
    fn new(known: &HashMap<(String, String), i64>, device_list_writers: &[String]) -> Self {
        let mut writers: HashSet<_> = known.keys().cloned().collect();
        writers.extend(device_list_writers.iter().map(|w| ("device_lists".to_owned(), w.clone())));
        Self { streams: STREAMS.to_vec(), writers }
    }

    fn reported(&mut self, stream: &str, instance: &str) {
        self.streams.retain(|s| *s != stream);
        self.writers.remove(&(stream.to_owned(), instance.to_owned()));
    }

    fn done(&self) -> bool {
        self.streams.is_empty() && self.writers.is_empty()
    }

    fn silent(&self) -> Vec<(String, String)> {
        self.writers.iter().cloned().collect()
    }
}

fn trust(app: &Follower) {
    app.status.set_caught_up();
    app.caches.set_trusted(true);
}

fn apply_row(inv: &Invalidator, stream: &str, row: &serde_json::Value) {
    match stream {
        "device_lists" => match protocol::device_list_row(row) {
            protocol::DeviceListRow::User(user) => inv.user_changed(user),
            protocol::DeviceListRow::Repeat => {}
            // Whose devices changed cannot be told, yet later tokens will
            // count as delivered: nothing cached may survive it.
            protocol::DeviceListRow::Unreadable => {
                tracing::warn!(%row, "a device_lists row we cannot read; dropping every cached entry");
                inv.everything();
            }
        },
        "caches" => match protocol::cache_row(row) {
            Some((func, keys)) => inv.synapse_cache(func, keys.as_deref()),
            None => {
                tracing::warn!(%row, "a caches row we cannot read; dropping every cached entry");
                inv.everything();
            }
        },
        _ => {}
    }
}

type Key = (String, String);

/// Where each writer's stream stands, kept as Synapse's
/// `ReplicationCommandHandler` keeps it. A writer's position moves with its
/// `RDATA` only once its `POSITION` has been handled on this connection:
/// rows published between our subscription and that `POSITION` may come
/// after a gap, and taking their token as the position would hide the gap
/// (Synapse discards such rows and catches up when the `POSITION` comes).
#[derive(Debug, Default)]
struct Positions {
    /// The last position seen of each (stream, writer), across sessions.
    known: HashMap<Key, i64>,
    /// Whose `POSITION` has been handled on the current connection.
    positioned: HashSet<Key>,
    /// Sessions begun: after the first, the caches may hold entries that
    /// what was written while we were away made stale.
    sessions: u64,
}

/// What a writer's `POSITION` asks of us.
#[derive(Debug, PartialEq)]
enum Step {
    Nothing,
    /// Read the writer's rows in `(after, upto]` back from the database.
    CatchUp {
        after: i64,
        upto: i64,
    },
    /// A writer we did not follow spoke after a reconnect: what it wrote
    /// while we were away cannot be told apart.
    DropAll,
    /// A writer's first position on the first connection: what it wrote
    /// before we subscribed was never delivered. The data caches are not
    /// trusted yet (they hold nothing older than this), but resync results
    /// may be: they are dropped, so that the position can be taken as
    /// delivered.
    Start,
}

impl Positions {
    /// A new connection: every writer has to report again. Returns whether
    /// it is a reconnect (a session came before it, whether or not any
    /// writer reported in it: its caches were trusted once it settled).
    fn begin_session(&mut self) -> bool {
        self.positioned.clear();
        self.sessions += 1;
        self.sessions > 1
    }

    /// Returns whether the row's token counts as the writer's position
    /// (its `POSITION` came first on this connection).
    fn rdata(&mut self, key: Key, token: i64) -> bool {
        if !self.positioned.contains(&key) {
            return false;
        }
        let p = self.known.entry(key).or_insert(token);
        *p = (*p).max(token);
        true
    }

    /// Synapse's rule: rows were missed unless `prev <= last <= new`.
    fn position(&mut self, key: Key, prev: i64, new: i64, reconnecting: bool) -> Step {
        let step = match self.known.get(&key).copied() {
            None if reconnecting => Step::DropAll,
            None => Step::Start,
            Some(last) if prev <= last && last <= new => Step::Nothing,
            Some(last) if last < new => Step::CatchUp { after: last, upto: new },
            // The stream was reset (a writer's restart): nothing to read.
            Some(_) => Step::Nothing,
        };
        self.known.insert(key.clone(), new);
        self.positioned.insert(key);
        step
    }

    fn forget(&mut self, key: &Key) {
        self.known.remove(key);
        self.positioned.remove(key);
    }
}

async fn follow_step(app: &Follower, inv: &Invalidator, key: &Key, step: Step) {
    match step {
        Step::Nothing => return,
        Step::Start => {
            inv.everything();
            return;
        }
        Step::DropAll => {
            tracing::warn!(stream = key.0, instance = key.1, "position of a writer we did not follow; dropping all cached entries")
        }
        Step::CatchUp { after, upto } => match catch_up(app, inv, &key.0, &key.1, after, upto).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "catch-up from the database failed; dropping all cached entries"),
        },
    }
    app.invalidator.everything();
    app.status.count_dropped_all();
}

/// Applies the rows of `stream` written by `instance` in `(after, upto]`.
pub(super) async fn catch_up(
    app: &Follower,
    inv: &Invalidator,
    stream: &str,
    instance: &str,
    after: i64,
    upto: i64,
) -> Result<(), sqlx::Error> {
    let n = match stream {
        "device_lists" => {
            let rows = app.store.device_list_changes(after, upto, Some(instance)).await?;
            for r in &rows {
                inv.user_changed(&r.user_id);
            }
            rows.len()
        }
        _ => {
            let rows = app.store.cache_invalidations(after, upto, Some(instance)).await?;
            for r in &rows {
                inv.synapse_cache(&r.cache_func, r.keys.as_deref());
            }
            rows.len()
        }
    };
    tracing::info!(stream, instance, after, upto, rows = n, "caught up from the database");
    app.status.count_caught_up_rows(stream, instance, n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnect_waits_for_every_writer_it_knew() {
        let known = HashMap::from([
            (("device_lists".to_owned(), "dl1".to_owned()), 5),
            (("device_lists".to_owned(), "dl2".to_owned()), 7),
            (("caches".to_owned(), "main".to_owned()), 9),
        ]);
        let mut awaited = Awaited::new(&known, &[]);
        awaited.reported("device_lists", "dl1");
        awaited.reported("caches", "main");
        // Both streams have spoken, but dl2 (which may have written while
        // we were away) has not.
        assert!(!awaited.done());
        assert_eq!(awaited.silent(), [("device_lists".to_owned(), "dl2".to_owned())]);
        awaited.reported("device_lists", "dl2");
        assert!(awaited.done());
    }

    fn key(stream: &str, writer: &str) -> Key {
        (stream.to_owned(), writer.to_owned())
    }

    #[test]
    fn rows_published_before_a_writers_position_do_not_hide_a_gap() {
        let mut p = Positions::default();
        assert!(!p.begin_session());
        assert_eq!(p.position(key("device_lists", "master"), 10, 10, false), Step::Start);
        p.rdata(key("device_lists", "master"), 12);
        // Away while rows 13..=20 were written; back, an RDATA (21) comes
        // before the writer's answer to REPLICATE (21, 21).
        assert!(p.begin_session());
        p.rdata(key("device_lists", "master"), 21);
        assert_eq!(p.position(key("device_lists", "master"), 21, 21, true), Step::CatchUp { after: 12, upto: 21 });
        // From now on RDATA moves the position, and a POSITION that follows
        // on from it asks for nothing.
        p.rdata(key("device_lists", "master"), 23);
        assert_eq!(p.position(key("device_lists", "master"), 23, 25, true), Step::Nothing);
        assert_eq!(p.position(key("device_lists", "master"), 27, 30, true), Step::CatchUp { after: 25, upto: 30 });
    }

    #[test]
    fn after_a_reconnect_an_unknown_writer_drops_everything_even_if_its_rows_came_first() {
        let mut p = Positions::default();
        assert!(!p.begin_session());
        p.position(key("device_lists", "dl1"), 5, 5, false);
        assert!(p.begin_session());
        p.rdata(key("device_lists", "dl2"), 8);
        assert_eq!(p.position(key("device_lists", "dl2"), 8, 8, true), Step::DropAll);
        // A stream reset (the writer restarted) reads nothing.
        assert_eq!(p.position(key("device_lists", "dl1"), 2, 3, true), Step::Nothing);
    }

    /// A first session in which no writer ever reported still makes the
    /// next one a reconnect: a writer speaking then is one we cannot catch
    /// up, so everything is dropped.
    #[test]
    fn a_reconnect_after_a_session_without_positions_drops_what_it_cannot_catch_up() {
        let mut p = Positions::default();
        assert!(!p.begin_session());
        assert!(p.begin_session(), "the second session is a reconnect");
        assert_eq!(p.position(key("device_lists", "master"), 40, 40, true), Step::DropAll);
    }

    #[test]
    fn a_first_connection_waits_for_each_stream_and_each_device_list_writer() {
        let mut awaited = Awaited::new(&HashMap::new(), &["dl1".to_owned(), "dl2".to_owned()]);
        awaited.reported("device_lists", "dl2");
        awaited.reported("caches", "client_reader");
        assert!(!awaited.done(), "dl1 has not reported");
        awaited.reported("device_lists", "dl1");
        assert!(awaited.done());
    }
}
