//! A TCP proxy that can be cut (every connection through it dropped, new
//! ones refused, as if the server went away), frozen (connections stay
//! open but no byte moves, as if the server hung) or slowed (every byte
//! arrives a fixed delay after it was sent, as over a long link).

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
}

struct State {
    open: bool,
    links: Vec<AbortHandle>,
}

/// Copies `from` → `to`, holding bytes while the proxy is frozen and
/// delivering each chunk `delay` after it was read (in order).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = tokio::time::Instant::now() + *delay.borrow();
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { open: true, links: Vec::new() }));
        let (frozen, _) = watch::channel(false);
        let (delay, _) = watch::channel(Duration::ZERO);
        let (upstream, shared, frozen_tx, delay_tx) = (upstream.to_owned(), state.clone(), frozen.clone(), delay.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !shared.lock().unwrap().open {
                    drop(client);
                    continue;
                }
                let (upstream, frozen, delay) = (upstream.clone(), frozen_tx.subscribe(), delay_tx.subscribe());
                let link = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, frozen.clone(), delay.clone()), pump(sr, cw, frozen, delay));
                });
                shared.lock().unwrap().links.push(link.abort_handle());
            }
        });
        Self { port, state, frozen, delay }
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

    /// Every chunk read from now on arrives `delay` later.
    pub fn set_delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}
