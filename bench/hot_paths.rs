//! Criterion benches of the pure hot paths of a `/keys/query`, on keys
//! shaped like those Element's clients upload: `cargo bench --bench
//! hot_paths` (or `-- --quick` for a short run).
//!
//! - `render_user`: one user's three devices rendered from stored JSON with
//!   their owner's signatures (what a cache fill does, and what every query
//!   did before answers were rendered once).
//! - `serialise_answer_10_users`: a warm answer for 10 users (devices and
//!   cross-signing keys from the caches) written out.
//! - `merge_signatures`: one signature merged into a device's keys.
//! - `cache_lookup_10_users`: 10 hits in a guarded cache.
//! - `parse_query_10_users`: a 10-user `/keys/query` body read.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use synapse_keys_worker::cache::{GuardedCache, Trust};
use synapse_keys_worker::keys::json::{merge_signatures, parse_object};
use synapse_keys_worker::keys::rendered::{CrossSigningKey, DeviceMap, KeyJson, RenderedDevices};
use synapse_keys_worker::keys::{KeysQuery, KeysQueryResponse};
use synapse_keys_worker::store::{CrossSigningKeyRow, DeviceKeyRow, SignatureRow};

fn device_json(user: &str, device: &str) -> String {
    serde_json::json!({
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "device_id": device,
        "keys": {
            format!("curve25519:{device}"): "3C5BFWi2Y8MaVvjM8M22DBmh24PmgR0nPvJOIArzgyI",
            format!("ed25519:{device}"): "lEuiRJBit0IG6nUf5pUzWTUEsRVVe/HJkoKuEww9ULI",
        },
        "signatures": { user: { format!("ed25519:{device}"): "dSO80A01XiigH3uBiDVx/EjzaoycHcjq9lfQX0uWsqxl2giMIiSPR8a4d291W1ihKJL/a+myXS367WT6NAIcBA" } },
        "user_id": user,
    })
    .to_string()
}

fn user_rows(user: &str) -> (Vec<DeviceKeyRow>, Vec<SignatureRow>) {
    let devices: Vec<DeviceKeyRow> = ["PHONE", "LAPTOP", "TABLET"]
        .iter()
        .map(|d| DeviceKeyRow {
            user_id: user.into(),
            device_id: (*d).into(),
            display_name: Some(format!("{d} of {user}")),
            key_json: Some(device_json(user, d)),
        })
        .collect();
    let sigs = devices
        .iter()
        .map(|d| SignatureRow {
            user_id: user.into(),
            key_id: "ed25519:SSKPUBLICPART".into(),
            target_user_id: user.into(),
            target_device_id: d.device_id.clone(),
            signature: "K8ZmQnG1hZC7Zs8oLTtH0ESwTZM4dq1NQ8Jm4E3cxk1bnL8JD9Rz3gZJ5x0cQ1v3m4pSgWQ3T7kP2NLNzY0LCA".into(),
        })
        .collect();
    (devices, sigs)
}

fn cross_signing(user: &str) -> Arc<Vec<CrossSigningKey>> {
    let key = |keytype: &str, public: &str| {
        CrossSigningKeyRow {
        user_id: user.into(),
        keytype: keytype.into(),
        keydata: serde_json::json!({
            "keys": { format!("ed25519:{public}"): public },
            "usage": [keytype],
            "user_id": user,
            "signatures": { user: { "ed25519:PHONE": "v6Dy0Yp6HTLQW4rmT3UVwIr7Hq4KvJcD8bZPN1kx0fQ2e5z3TG4Fd5i0vF1Q8qBmUy3Lk9rN2wS6pH7cXnA0BQ" } },
        })
        .to_string(),
    }
    };
    let rows = [key("master", "MASTERPUBLICPART"), key("self_signing", "SSKPUBLICPART")];
    Arc::new(rows.iter().filter_map(CrossSigningKey::parse).collect())
}

fn users() -> Vec<String> {
    (0..10).map(|i| format!("@user{i}:example.org")).collect()
}

fn benches(c: &mut Criterion) {
    let (rows, sigs) = user_rows("@alice:example.org");
    c.bench_function("render_user", |b| b.iter(|| RenderedDevices::local(black_box(&rows), black_box(&sigs), true)));

    let rendered: Vec<(String, Arc<RenderedDevices>, Arc<Vec<CrossSigningKey>>)> = users()
        .into_iter()
        .map(|u| {
            let (rows, sigs) = user_rows(&u);
            let devices = Arc::new(RenderedDevices::local(&rows, &sigs, true));
            let keys = cross_signing(&u);
            (u, devices, keys)
        })
        .collect();
    c.bench_function("serialise_answer_10_users", |b| {
        b.iter(|| {
            let mut resp = KeysQueryResponse::default();
            for (u, devices, keys) in &rendered {
                resp.device_keys.insert(u.clone(), DeviceMap::Rendered(devices.clone(), Vec::new()));
                resp.master_keys.insert(u.clone(), KeyJson::Shared(keys.clone(), 0));
                resp.self_signing_keys.insert(u.clone(), KeyJson::Shared(keys.clone(), 1));
            }
            serde_json::to_vec(black_box(&resp)).expect("serialises")
        })
    });

    let keys = parse_object(&device_json("@alice:example.org", "PHONE")).expect("an object");
    c.bench_function("merge_signatures", |b| {
        b.iter(|| {
            let mut k = keys.clone();
            merge_signatures(&mut k, "@alice:example.org", black_box(&[("ed25519:SSKPUBLICPART", "c2lnbmF0dXJl")]), true);
            k
        })
    });

    let cache: GuardedCache<String, Arc<RenderedDevices>> =
        GuardedCache::new("bench", 1 << 30, Duration::from_secs(600), |_, _| 1, Arc::new(Trust::trusted()));
    for (u, devices, _) in &rendered {
        let ticket = cache.ticket(u.as_str());
        cache.insert(u.clone(), devices.clone(), ticket);
    }
    let asked: Vec<&str> = rendered.iter().map(|(u, _, _)| u.as_str()).collect();
    c.bench_function("cache_lookup_10_users", |b| {
        b.iter(|| {
            let found: BTreeMap<&str, Arc<RenderedDevices>> = asked.iter().filter_map(|u| Some((*u, cache.get(*u)?))).collect();
            assert_eq!(found.len(), 10);
            found
        })
    });

    let body = serde_json::to_vec(
        &serde_json::json!({"device_keys": asked.iter().map(|u| (*u, Vec::<String>::new())).collect::<BTreeMap<_, _>>()}),
    )
    .expect("serialises");
    c.bench_function("parse_query_10_users", |b| {
        b.iter(|| {
            let q = KeysQuery::parse(black_box(&body)).expect("a valid body");
            assert_eq!(q.users.len(), 10);
            q
        })
    });
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(hot_paths);
