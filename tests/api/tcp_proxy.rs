//! A TCP proxy that can be cut: closing it drops every connection through
//! it and refuses new ones, as if the server behind it went away.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct TcpProxy {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

struct State {
    open: bool,
    links: Vec<AbortHandle>,
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { open: true, links: Vec::new() }));
        let (upstream, shared) = (upstream.to_owned(), state.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !shared.lock().unwrap().open {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                shared.lock().unwrap().links.push(link.abort_handle());
            }
        });
        Self { port, state }
    }

    pub fn set_open(&self, open: bool) {
        let mut s = self.state.lock().unwrap();
        s.open = open;
        if !open {
            for link in s.links.drain(..) {
                link.abort();
            }
        }
    }
}
