//! The bench's ceiling: the same HTTP stack as the service (tokio's
//! multi-threaded runtime, axum on hyper, HTTP/1.1 and h2c) answering every
//! request with one fixed, pre-serialised answer: the status line, headers
//! and body the service gave for the scenario's query, read from a file.
//! The body is read, but nothing else: no auth, no cache, no JSON: what the machine can do when an answer
//! costs nothing but writing bytes.
//!
//!     cargo run --release --example ceiling -- 127.0.0.1:PORT ANSWER.json
//!
//! ANSWER.json is `{"headers": [[name, value], ...], "body": "..."}`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(file)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: ceiling ADDR ANSWER.json");
    };
    let answer: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    let mut headers = HeaderMap::new();
    for pair in answer["headers"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (pair[0].as_str(), pair[1].as_str()) else {
            anyhow::bail!("{file}: a header is not [name, value]");
        };
        headers.append(HeaderName::try_from(name)?, HeaderValue::try_from(value)?);
    }
    let Some(body) = answer["body"].as_str() else {
        anyhow::bail!("{file}: no body");
    };
    let fixed = Arc::new((headers, Bytes::from(body.to_owned())));
    // The request body is read whole, as the service reads it (a body left
    // unread would make hyper close the connection after the answer).
    let router = Router::new().fallback(move |_request: Bytes| {
        let fixed = Arc::clone(&fixed);
        async move { (fixed.0.clone(), fixed.1.clone()).into_response() }
    });
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, router).await?;
    Ok(())
}
