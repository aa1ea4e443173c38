//! A TCP proxy that can be cut (every connection through it dropped, new
//! ones refused, as if the server went away), frozen (connections stay
//! open but no byte moves, as if the server hung) or slowed (every byte
//! arrives a fixed delay after it was sent, as over a long link). Freezing
//! can also be limited to the connections whose client sent a given word
//! (a Redis subscription, say), as a NAT or load balancer that silently
//! drops one idle connection while the others work.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

pub struct TcpProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    frozen: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    /// Freezes only the connections whose client sent [`TcpProxy::mark`].
    frozen_marked: watch::Sender<bool>,
}

/// How one direction of a link is held: the proxy's switches, and whether
/// its connection is marked.
#[derive(Clone)]
struct Hold {
    frozen: watch::Receiver<bool>,
    frozen_marked: watch::Receiver<bool>,
    marked: watch::Receiver<bool>,
}

impl Hold {
    /// Waits until bytes may move; false once the proxy is gone.
    async fn released(&mut self) -> bool {
        loop {
            let held = *self.frozen.borrow_and_update() || (*self.marked.borrow_and_update() && *self.frozen_marked.borrow_and_update());
            if !held {
                return true;
            }
            let changed = tokio::select! {
                r = self.frozen.changed() => r,
                r = self.frozen_marked.changed() => r,
                r = self.marked.changed() => r,
            };
            if changed.is_err() {
                return false;
            }
        }
    }
}

struct State {
    open: bool,
    links: Vec<AbortHandle>,
}

/// Copies `from` → `to`, holding bytes while the proxy is frozen and
/// delivering each chunk `delay` after it was read (in order). `mark`: the
/// link is marked once a chunk from `from` contains it (any case).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hold: Hold,
    delay: watch::Receiver<Duration>,
    mark: Option<(&'static [u8], Arc<watch::Sender<bool>>)>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some((word, marked)) = &mark
                && buf[..n].windows(word.len()).any(|w| w.eq_ignore_ascii_case(word))
            {
                marked.send_replace(true);
            }
            let due = tokio::time::Instant::now() + *delay.borrow();
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if !hold.released().await || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> Self {
        Self::start_marking(upstream, None).await
    }

    /// A proxy that marks the connections whose client sends `mark`.
    pub async fn start_marking(upstream: &str, mark: Option<&'static [u8]>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { open: true, links: Vec::new() }));
        let (frozen, _) = watch::channel(false);
        let (delay, _) = watch::channel(Duration::ZERO);
        let (frozen_marked, _) = watch::channel(false);
        let (upstream, shared, frozen_tx, delay_tx, marked_tx) =
            (upstream.to_owned(), state.clone(), frozen.clone(), delay.clone(), frozen_marked.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !shared.lock().unwrap().open {
                    drop(client);
                    continue;
                }
                let marked = Arc::new(watch::Sender::new(false));
                let hold = Hold { frozen: frozen_tx.subscribe(), frozen_marked: marked_tx.subscribe(), marked: marked.subscribe() };
                let (upstream, delay) = (upstream.clone(), delay_tx.subscribe());
                let link = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // The link keeps its mark's sender: an unmarked link is one
                    // whose mark never changes, not a closed one.
                    let mark = mark.map(|word| (word, Arc::clone(&marked)));
                    tokio::join!(pump(cr, sw, hold.clone(), delay.clone(), mark), pump(sr, cw, hold, delay, None));
                    drop(marked);
                });
                shared.lock().unwrap().links.push(link.abort_handle());
            }
        });
        Self { port, state, frozen, delay, frozen_marked }
    }

    /// Closed: drop every connection and refuse new ones.
    pub fn set_open(&self, open: bool) {
        let mut s = self.state.lock().unwrap();
        s.open = open;
        if !open {
            for link in s.links.drain(..) {
                link.abort();
            }
        }
    }

    /// Frozen: connections stay up, nothing gets through.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Frozen for the marked connections only (see `start_marking`).
    pub fn set_frozen_marked(&self, frozen: bool) {
        self.frozen_marked.send_replace(frozen);
    }

    /// Every chunk read from now on arrives `delay` later.
    pub fn set_delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}
