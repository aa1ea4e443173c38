//! Memory that requests could grow: every structure keyed by what a client
//! sends is bounded. The real binary is run, so its resident memory can be
//! read; a query naming tens of thousands of servers and thousands of
//! requests with invented methods must leave the remembered destinations,
//! the `/metrics` text and the RSS flat.

use futures::StreamExt;
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::helpers::{Ask, ServiceProcess, Synapse, TokenIn, http, metric_value};

/// One query naming `n` servers nobody has seen (never resolved: `.invalid`).
async fn query_many_servers(service: &ServiceProcess, token: &str, round: usize, n: usize) {
    let users: Map<String, Value> = (0..n).map(|i| (format!("@u:r{round}s{i}.invalid"), json!([]))).collect();
    let ask = Ask::keys_query("v3", token, TokenIn::Header, &json!({ "device_keys": users }));
    let (status, answer) = ask.send(&service.url).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failures"].as_object().map(Map::len), Some(n), "every server is a failure");
}

#[tokio::test]
async fn ten_thousand_servers_per_query_leave_memory_flat() {
    let hs = Synapse::new();
    let me = hs.register("many").await;
    // Small caches, so that four rounds go well past every bound.
    let service = ServiceProcess::start_with(&[
        ("SYNAPSE_KEYS_WORKER_CACHE_MAX_BYTES", "1048576"),
        ("SYNAPSE_KEYS_WORKER_TOKEN_CACHE_MAX_ENTRIES", "1000"),
        ("SYNAPSE_KEYS_WORKER_RESYNC_CACHE_MAX_USERS", "1000"),
    ])
    .await;
    let mut rss = Vec::new();
    for round in 0..4 {
        query_many_servers(&service, &me.session.token, round, 10_000).await;
        let remembered = metric_value(&service.metrics().await, "synapse_keys_worker_federation_destinations_remembered");
        assert!(remembered <= 10_000.0, "round {round}: {remembered} destinations remembered");
        rss.push(service.rss_kib());
    }
    println!("RSS after each round of 10,000 new servers (KiB): {rss:?}");
    // The first round fills the bounded tables; later rounds only replace.
    let growth = rss[3].saturating_sub(rss[1]);
    assert!(growth < 32 * 1024, "RSS grew by {growth} KiB over two rounds of 10,000 new servers: {rss:?}");
}

#[tokio::test]
async fn invented_methods_do_not_grow_the_metrics() {
    let service = ServiceProcess::start().await;
    let client = http();
    let send_batch = |seed: usize, n: usize| {
        let (client, url) = (client.clone(), service.url.clone());
        async move {
            let requests = (0..n).map(|i| {
                let method = Method::from_bytes(format!("M{seed}X{i}").as_bytes()).unwrap();
                client.request(method, format!("{url}/_matrix/client/v3/keys/query")).send()
            });
            // 50 at a time: a steady number of connections.
            let statuses: Vec<u16> =
                futures::stream::iter(requests).buffer_unordered(50).map(|r| r.unwrap().status().as_u16()).collect().await;
            assert!(statuses.iter().all(|s| (400..500).contains(s)), "an invented method is a client error: {:?}", &statuses[..5]);
        }
    };
    // Warm up: the `other` series exist after the first batch, and the
    // `/metrics` route's own after the first scrape.
    send_batch(0, 1_000).await;
    service.metrics().await;
    let before_text = service.metrics().await;
    let before = before_text.len();
    let rss_before = service.rss_kib();
    for seed in 1..=9 {
        send_batch(seed, 1_000).await;
    }
    let after = service.metrics().await.len();
    let rss_after = service.rss_kib();
    println!("/metrics: {before} bytes before, {after} after 9,000 more invented methods; RSS {rss_before} -> {rss_after} KiB");
    // Counter values gain digits; no series is added.
    assert!(after < before + 512, "/metrics grew from {before} to {after} bytes");
    assert_eq!(before_text.lines().count(), service.metrics().await.lines().count(), "no series added");
    assert!(rss_after < rss_before + 8 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
}
