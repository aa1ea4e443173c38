//! MSC3984 (`experimental_features.msc3984_appservice_key_query`): the
//! application services are asked for the device keys of their exclusive
//! users, as Synapse's `ApplicationServicesHandler.query_keys` and
//! `ApplicationServiceApi.query_keys` ask them.

use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::Config;
use crate::config::appservice::AppService;
use crate::keys::UserQuery;

pub struct AppServiceKeys {
    http: reqwest::Client,
    services: Vec<AppService>,
}

impl std::fmt::Debug for AppServiceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppServiceKeys").field("services", &self.services.len()).finish()
    }
}

impl AppServiceKeys {
    /// `None` unless the flag is on.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        if !config.synapse.msc3984_appservice_key_query {
            return Ok(None);
        }
        let http = reqwest::Client::builder().user_agent(crate::federation::USER_AGENT).build()?;
        Ok(Some(Self { http, services: config.synapse.app_services.clone() }))
    }

    /// The services' merged answer for the local users of a query. As in
    /// Synapse, each service is asked about the users it holds exclusively,
    /// any failure (status, garbage, no answer by `deadline`) counts as no
    /// information, and the top-level fields of later answers replace those
    /// of earlier ones (`dict.update`).
    pub async fn query(&self, local: &[UserQuery<'_>], deadline: Instant) -> Map<String, Value> {
        // Synapse's first gate: some service's exclusive namespace matches.
        let held: Vec<&UserQuery> = local.iter().filter(|(u, _)| self.services.iter().any(|s| s.has_exclusive_namespace_for(u))).collect();
        let asks = self.services.iter().filter_map(|service| {
            let url = service.url.as_deref()?;
            let query: Map<String, Value> = held
                .iter()
                .filter(|(u, _)| service.is_exclusive_user(u))
                .map(|(u, devices)| ((*u).to_owned(), Value::from(devices.to_vec())))
                .collect();
            (!query.is_empty()).then(|| self.ask(service, url, query, deadline))
        });
        let answers = futures::future::join_all(asks).await;
        let mut merged = Map::new();
        for answer in answers.into_iter().flatten() {
            merged.extend(answer);
        }
        merged
    }

    async fn ask(&self, service: &AppService, url: &str, query: Map<String, Value>, deadline: Instant) -> Option<Map<String, Value>> {
        let uri = format!("{url}/_matrix/app/unstable/org.matrix.msc3984/keys/query");
        let send = self.http.post(&uri).bearer_auth(&service.hs_token).json(&query).send();
        let answer = async {
            let resp = send.await.ok()?.error_for_status().ok()?;
            resp.json::<Map<String, Value>>().await.ok()
        };
        let answer = tokio::time::timeout_at(deadline.into(), answer).await.ok().flatten();
        if answer.is_none() {
            tracing::warn!(service = %service.id, "query_keys to the application service gave no usable answer");
        }
        answer
    }
}
