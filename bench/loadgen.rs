//! The bench's open-loop load generator: requests sent at a fixed rate
//! whatever the server does. Sending never waits for an answer (each
//! request is its own task, on a free keep-alive connection or a new one),
//! so a server that stalls is charged for every request sent meanwhile:
//! their latency, counted from when each was sent on schedule, includes the
//! wait (no coordinated omission, as wrk2 and oha with a rate measure).
//! The timer wakes the sender up to about a millisecond late; that lateness
//! is the generator's, not the server's, so it is reported apart (`lag_ms`)
//! rather than added to the latencies.
//!
//! `loadgen URL RATE SECONDS TOKENS_FILE BODY_FILE` POSTs BODY_FILE to URL
//! RATE times a second for SECONDS (after one second at that rate that is
//! not counted, to open the connections the load needs), cycling the access tokens of
//! TOKENS_FILE (one a line), over at most [`CONNECTIONS`] keep-alive
//! connections (a request due while all are busy waits for one, and the
//! wait counts in its latency: a server that falls behind is charged, not
//! flooded with new connections until connects fail). Prints one JSON object: the percentiles (ms), how many
//! requests were answered 200 and how many were not, and how far behind
//! schedule the generator itself fell (`lag_ms`: if that is not small, the
//! generator, not the server, was the bottleneck).
//!
//! `loadgen --burst URL N TOKEN BODY_FILE` sends N copies of one query at
//! once, each on a connection of its own opened beforehand, and prints one
//! JSON array of `[status, latency ms, answer]` (the bench's (g) and (h)).
//! Async on one thread, so a thousand answers arriving together are read
//! as they come: a client of a thread per query spent seconds of its own
//! reading them, which the bench then charged to the server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Semaphore};

/// Most requests in flight, so most connections open, at once.
const CONNECTIONS: usize = 64;

struct Outcome {
    latencies_us: Vec<u64>,
    errors: u64,
    /// Failures by kind (`status 503`, `timeout`, `connect`, `other`).
    error_kinds: std::collections::BTreeMap<String, u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, url, n, token, body] = &args[..]
        && flag == "--burst"
    {
        let body = bytes::Bytes::from(std::fs::read(body).expect("BODY_FILE"));
        return burst(url, n.parse().expect("N: queries"), token, body).await;
    }
    let [_, url, rate, seconds, tokens, body] = &args[..] else {
        eprintln!("usage: loadgen URL RATE SECONDS TOKENS_FILE BODY_FILE | loadgen --burst URL N TOKEN BODY_FILE");
        std::process::exit(2);
    };
    let rate: f64 = rate.parse().expect("RATE: requests a second");
    let seconds: f64 = seconds.parse().expect("SECONDS");
    let tokens: Vec<String> =
        std::fs::read_to_string(tokens).expect("TOKENS_FILE").lines().filter(|l| !l.is_empty()).map(|t| format!("Bearer {t}")).collect();
    let body = bytes::Bytes::from(std::fs::read(body).expect("BODY_FILE"));
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(usize::MAX).timeout(Duration::from_secs(30)).build().expect("an HTTP client");
    let warm_up = rate.round() as u64;
    let total = (rate * seconds).round() as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let outcome =
        Arc::new(Mutex::new(Outcome { latencies_us: Vec::with_capacity(total as usize), errors: 0, error_kinds: Default::default() }));
    let start = Instant::now() + Duration::from_millis(50);
    let mut lag = Duration::ZERO;
    let mut tasks = Vec::with_capacity((warm_up + total) as usize);
    let slots = Arc::new(Semaphore::new(CONNECTIONS));
    for i in 0..warm_up + total {
        let counted = i >= warm_up;
        let due = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        if counted {
            lag = lag.max(sent.saturating_duration_since(due));
        }
        let request = client
            .post(url)
            .header("Authorization", &tokens[i as usize % tokens.len()])
            .header("Content-Type", "application/json")
            .body(body.clone());
        let outcome = outcome.clone();
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire().await.expect("never closed");
            let failure = match request.send().await {
                Ok(r) if r.status() != 200 => Some(format!("status {}", r.status().as_u16())),
                Ok(r) => r.bytes().await.err().map(|e| error_kind(&e).to_owned()),
                Err(e) => Some(error_kind(&e).to_owned()),
            };
            let took = sent.elapsed();
            let mut o = outcome.lock().await;
            if !counted {
                return;
            }
            match failure {
                None => o.latencies_us.push(took.as_micros() as u64),
                Some(kind) => {
                    o.errors += 1;
                    *o.error_kinds.entry(kind).or_default() += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a request task");
    }
    let elapsed = start.elapsed().as_secs_f64() - 1.0;
    let mut o = outcome.lock().await;
    o.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        let l = &o.latencies_us;
        if l.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * l.len() as f64).ceil() as usize;
        l[i.clamp(1, l.len()) - 1] as f64 / 1000.0
    };
    let out = serde_json::json!({
        "rate": rate,
        "sent": total,
        "ok": o.latencies_us.len(),
        "errors": o.errors,
        "error_kinds": o.error_kinds,
        "achieved_rps": o.latencies_us.len() as f64 / elapsed,
        "p50": pct(50.0),
        "p99": pct(99.0),
        "p999": pct(99.9),
        "max": pct(100.0),
        "lag_ms": lag.as_secs_f64() * 1000.0,
    });
    println!("{out}");
}

fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "other"
    }
}

/// `n` copies of one POST, each on a connection opened beforehand, sent
/// together; prints `[[status, latency ms, answer], ...]` (status 0 and the
/// error for a query that failed).
async fn burst(url: &str, n: usize, token: &str, body: bytes::Bytes) {
    let uri: hyper::Uri = url.parse().expect("URL");
    let authority = uri.authority().expect("URL: a host and port").to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::net::TcpStream::connect(&authority).await.expect("a connection");
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("a handshake");
        tokio::spawn(conn);
        senders.push(sender);
    }
    let gate = Arc::new(tokio::sync::Barrier::new(n + 1));
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let request = hyper::Request::post(&path)
                .header("host", &authority)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.clone()))
                .expect("a request");
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.wait().await;
                let started = Instant::now();
                let answer = async {
                    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    let bytes =
                        axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, String::from_utf8_lossy(&bytes).into_owned()))
                }
                .await;
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                match answer {
                    Ok((status, text)) => serde_json::json!([status, ms, text]),
                    Err(e) => serde_json::json!([0, ms, e]),
                }
            })
        })
        .collect();
    gate.wait().await;
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("a query task"));
    }
    println!("{}", serde_json::Value::Array(out));
}
