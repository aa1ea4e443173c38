//! A TCP proxy that can be cut (every connection through it dropped, new
//! ones refused, as if the server went away) or frozen (connections stay
//! open but no byte moves, as if the server hung).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

pub struct TcpProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
    frozen: watch::Sender<bool>,
}

struct State {
    open: bool,
    links: Vec<AbortHandle>,
}

/// Copies `from` → `to`, holding bytes while the proxy is frozen.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { open: true, links: Vec::new() }));
        let (frozen, _) = watch::channel(false);
        let (upstream, shared, frozen_tx) = (upstream.to_owned(), state.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !shared.lock().unwrap().open {
                    drop(client);
                    continue;
                }
                let (upstream, frozen) = (upstream.clone(), frozen_tx.subscribe());
                let link = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, frozen.clone()), pump(sr, cw, frozen));
                });
                shared.lock().unwrap().links.push(link.abort_handle());
            }
        });
        Self { port, state, frozen }
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
}
