//! Application services (bridges) authenticate with their `as_token` and
//! may act as users of their namespace; asked of Synapse and of us.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Ask, Session, Synapse, TokenIn, assert_same, env, http, spawn_worker, synapse_before, unique};

fn as_token() -> String {
    std::env::var("SKW_TEST_AS_TOKEN").expect("SKW_TEST_AS_TOKEN: run through `bash scripts/test.sh`")
}

/// Registers `@bridged_…` through the application-service API.
async fn bridged_user() -> Session {
    let resp = http()
        .post(format!("{}/_matrix/client/v3/register", env().synapse_url))
        .bearer_auth(as_token())
        .json(&json!({"type": "m.login.application_service", "username": unique("bridged_")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let r: serde_json::Value = resp.json().await.unwrap();
    Session {
        user_id: r["user_id"].as_str().unwrap().into(),
        device_id: r["device_id"].as_str().unwrap().into(),
        token: r["access_token"].as_str().unwrap().into(),
    }
}

fn ask(query: &str, body: &serde_json::Value) -> Ask {
    let mut a = Ask::keys_query("v3", &as_token(), TokenIn::Header, body);
    if !query.is_empty() {
        a.path.push('?');
        a.path.push_str(query);
    }
    a
}

fn q(user: &str) -> String {
    url::form_urlencoded::byte_serialize(user.as_bytes()).collect()
}

#[tokio::test]
async fn app_service_tokens_act_like_in_synapse() {
    let hs = Synapse::new();
    let alice = hs.register("alice").await;
    hs.upload_device_keys(&alice.session).await;
    let bridged = bridged_user().await;
    hs.upload_device_keys(&bridged).await;
    let worker = spawn_worker().await;
    let body = json!({"device_keys": {&alice.user_id: [], &bridged.user_id: []}});
    let server = &env().server_name;
    let cases = [
        (String::new(), StatusCode::OK),
        (format!("user_id={}", q(&bridged.user_id)), StatusCode::OK),
        (format!("user_id={}", q(&format!("@bridgebot:{server}"))), StatusCode::OK),
        (format!("user_id={}&device_id={}", q(&bridged.user_id), bridged.device_id), StatusCode::OK),
        (format!("user_id={}", q(&format!("@bridged_nobody_{}:{server}", unique("x")))), StatusCode::FORBIDDEN),
        (format!("user_id={}", q(&alice.user_id)), StatusCode::FORBIDDEN),
    ];
    for (query, expected) in cases {
        let (status, answer) = assert_same(&worker, &ask(&query, &body)).await;
        assert_eq!(status, expected, "{query}: {answer}");
    }
    // A device the bridged user does not have: M_UNKNOWN_DEVICE, as Synapse
    // 1.162 and later answer; older releases ignore `device_id` or answer
    // another code, and the schema cannot tell which (docs/compatibility.md).
    let unknown = ask(&format!("user_id={}&device_id=NOPE", q(&bridged.user_id)), &body);
    if synapse_before("1.162") {
        let (status, answer) = unknown.send(&worker.url).await;
        assert_eq!((status, answer["errcode"].as_str()), (StatusCode::BAD_REQUEST, Some("M_UNKNOWN_DEVICE")), "{answer}");
    } else {
        let (status, answer) = assert_same(&worker, &unknown).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    // A wrong as_token is just an unknown token.
    let mut wrong = ask("", &body);
    wrong.headers[0].1 = "Bearer not-the-as-token".into();
    let (status, _) = assert_same(&worker, &wrong).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// `X-Forwarded-For` counts only with our `x_forwarded` on, as it counts for
/// Synapse only on a listener with `x_forwarded: true`. Ours alone: the test
/// Synapse's registration has no `ip_range_whitelist` (and no request may go
/// to a private address, so the range is only matched, never contacted).
#[tokio::test]
async fn forwarded_address_trusted_only_when_configured() {
    let body = json!({"device_keys": {}});
    let config = |x_forwarded: bool| {
        let mut config = crate::remote::base_config();
        config.synapse.app_services[0].ip_range_whitelist = Some(vec!["10.0.0.0/8".parse().unwrap()]);
        config.worker.x_forwarded = x_forwarded;
        config
    };
    let forwarded = |from: Option<&str>| {
        let mut a = ask("", &body);
        if let Some(ip) = from {
            a.headers.push(("X-Forwarded-For".into(), format!("{ip}, 127.0.0.1")));
        }
        a
    };
    let untrusting = crate::helpers::spawn_worker_with(config(false)).await;
    let trusting = crate::helpers::spawn_worker_with(config(true)).await;
    // The peer (loopback) is outside the range: the token is not the
    // service's, so it is an unknown token.
    for (worker, from, expected) in [
        (&untrusting, Some("10.1.2.3"), StatusCode::UNAUTHORIZED),
        (&untrusting, None, StatusCode::UNAUTHORIZED),
        (&trusting, Some("10.1.2.3"), StatusCode::OK),
        (&trusting, Some("192.0.2.1"), StatusCode::UNAUTHORIZED),
        (&trusting, None, StatusCode::UNAUTHORIZED),
    ] {
        let (status, answer) = forwarded(from).send(&worker.url).await;
        assert_eq!(status, expected, "x_forwarded={} from={from:?}: {answer}", std::ptr::eq(worker, &trusting));
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(answer["errcode"], "M_UNKNOWN_TOKEN", "{answer}");
        }
    }
}
