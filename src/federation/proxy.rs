//! `outbound_federation_restricted_to`: federation requests go through one of
//! the listed Synapse instances, as Synapse's `ProxyAgent` sends them: an
//! HTTP/1.1 request to the instance whose target is
//! `matrix-federation://<destination><path>`, with `Proxy-Authorization:
//! Bearer <worker_replication_secret>`. The instance does server discovery,
//! TLS and its own IP checks; we sign the request as usual.

use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rand::seq::IndexedRandom;

use super::FedError;
use crate::config::synapse::InstanceLocation;

pub struct FederationProxy {
    locations: Vec<InstanceLocation>,
    authorization: HeaderValue,
}

/// What the remote (through the proxy) answered.
pub struct ProxiedResponse {
    pub status: StatusCode,
    pub body: bytes::Bytes,
}

impl FederationProxy {
    /// `None` when federation is not restricted.
    pub fn new(locations: &[InstanceLocation], secret: Option<&str>) -> anyhow::Result<Option<Self>> {
        if locations.is_empty() {
            return Ok(None);
        }
        if let Some(InstanceLocation::Tcp { host, port, .. }) =
            locations.iter().find(|l| matches!(l, InstanceLocation::Tcp { tls: true, .. }))
        {
            anyhow::bail!("outbound_federation_restricted_to: the instance at {host}:{port} uses TLS, which is not supported here");
        }
        let secret = secret.ok_or_else(|| anyhow::anyhow!("outbound_federation_restricted_to needs worker_replication_secret"))?;
        Ok(Some(Self { locations: locations.to_vec(), authorization: HeaderValue::from_str(&format!("Bearer {secret}"))? }))
    }

    pub async fn send(
        &self,
        method: Method,
        destination: &str,
        path: &str,
        authorization: HeaderValue,
        body: Option<Vec<u8>>,
        max_bytes: usize,
    ) -> Result<ProxiedResponse, FedError> {
        let location = self.locations.choose(&mut rand::rng()).expect("at least one location");
        let mut req = Request::builder()
            .method(method)
            .uri(format!("matrix-federation://{destination}{path}"))
            .header(header::HOST, destination)
            .header(header::USER_AGENT, super::USER_AGENT)
            .header(header::AUTHORIZATION, authorization)
            .header(header::PROXY_AUTHORIZATION, self.authorization.clone());
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(axum::body::Body::from(body.unwrap_or_default()))
            .map_err(|e| FedError::Transport(format!("invalid proxied request: {e}")))?;
        let resp = match location {
            InstanceLocation::Tcp { host, port, .. } => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(connect_error)?;
                exchange(stream, req).await?
            }
            InstanceLocation::Unix { path } => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(connect_error)?;
                exchange(stream, req).await?
            }
        };
        let status = resp.status();
        let body = axum::body::to_bytes(axum::body::Body::new(resp.into_body()), max_bytes)
            .await
            .map_err(|_| FedError::BadResponse(format!("response larger than {max_bytes} bytes, or cut short")))?;
        Ok(ProxiedResponse { status, body })
    }
}

fn connect_error(e: std::io::Error) -> FedError {
    FedError::Transport(format!("ConnectError: federation proxy: {e}"))
}

async fn exchange<S>(stream: S, req: Request<axum::body::Body>) -> Result<axum::http::Response<hyper::body::Incoming>, FedError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let failed = |e: hyper::Error| FedError::Transport(format!("federation proxy: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(failed)?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(failed)
}
