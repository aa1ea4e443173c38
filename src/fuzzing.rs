//! Fuzz targets: every parser that reads bytes from outside (clients,
//! Redis, remote servers, the writer, MAS, config files), each with the
//! invariants its callers rely on. `fuzz/` runs them under libFuzzer
//! (`cargo +nightly fuzz run <target>`); the unit test below replays the
//! stored corpora plus seeded mutations of them on every test run.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::keys::remote::DestinationAnswer;

/// A fuzz target: takes any bytes, panics only when an invariant breaks.
pub type Target = fn(&[u8]);

/// The fuzz targets by name (the names of `fuzz/fuzz_targets/*.rs` and
/// `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Target)] = &[
    ("keys_query_body", keys_query_body),
    ("query_string", query_string),
    ("replication_line", replication_line),
    ("config", config),
    ("federation_answer", federation_answer),
    ("writer_answer", writer_answer),
    ("macaroon", macaroon),
    ("mas_introspection", mas_introspection),
];

/// A `/keys/query` body: parsed, or refused with a 4xx Matrix error.
pub fn keys_query_body(data: &[u8]) {
    match crate::keys::KeysQuery::parse(data) {
        Ok(q) => assert!(q.users.iter().all(|(u, _)| crate::ids::is_valid_user_id(u))),
        Err(e) => assert!(crate::error::MatrixError::from(e).status.is_client_error()),
    }
}

/// A query string: `timeout` read as Synapse reads it, or a 4xx.
pub fn query_string(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let params = crate::http::params::QueryParams::parse(Some(&text));
    if let Err(e) = params.non_negative_int("timeout") {
        assert!(e.status.is_client_error(), "{e:?}");
    }
    let _ = params.first("access_token");
}

/// A line from Synapse's Redis channel, and the rows it carries.
pub fn replication_line(data: &[u8]) {
    use crate::replication::protocol::{Command, cache_row, device_list_row, parse};
    if let Command::Rdata { row, .. } = parse(&String::from_utf8_lossy(data)) {
        let _ = device_list_row(&row);
        let _ = cache_row(&row);
    }
}

/// A configuration file: loaded, or refused with one line.
pub fn config(data: &[u8]) {
    let Ok(yaml_serde::Value::Mapping(mapping)) = yaml_serde::from_slice(data) else {
        return;
    };
    // Paths named in the file are read; never let one point at a device.
    let text = String::from_utf8_lossy(data);
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    if let Err(e) = crate::config::Config::from_mapping(mapping, Vec::new()) {
        assert!(!e.0.contains('\n'), "a config error is one line: {e}");
    }
}

/// A remote's `/user/keys/query` answer (also read as a `/user/devices`
/// answer): whatever it holds, what we take from it serialises.
pub fn federation_answer(data: &[u8]) {
    let Ok(remote) = crate::federation::parse_answer(reqwest::StatusCode::OK, data) else {
        return;
    };
    let mut query: Map<String, Value> = Map::new();
    if let Some(users) = remote.get("device_keys").and_then(Value::as_object) {
        query.extend(users.keys().take(16).map(|u| (u.clone(), Value::Array(Vec::new()))));
    }
    query.insert("@fuzz:remote.invalid".into(), Value::Array(Vec::new()));
    let mut answer = DestinationAnswer::default();
    answer.take_user_keys(&query, &remote);
    serde_json::to_vec(&answer.merged()).expect("an answer serialises");
    if let Ok(raw) = RawValue::from_string(remote.to_string()) {
        let _ = crate::resync::UserDevices::parse(raw, None);
    }
}

/// The writer's `multi_user_device_resync` answer.
pub fn writer_answer(data: &[u8]) {
    if let Ok(answer) = crate::resync::writer::WriterAnswer::parse(data) {
        for raw in answer.users.into_values().flatten() {
            let _ = crate::resync::UserDevices::parse(raw, answer.stream_pos.clone());
        }
    }
}

/// A guest token: as sent, and as the binary macaroon the bytes make.
pub fn macaroon(data: &[u8]) {
    use base64::Engine;
    let as_sent = String::from_utf8_lossy(data);
    assert_eq!(crate::guest::verify_guest_token(&as_sent, b"fuzzing secret", 0), None, "no forged token verifies");
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data);
    assert_eq!(crate::guest::verify_guest_token(&encoded, b"fuzzing secret", 0), None, "no forged token verifies");
}

/// MAS's introspection answer, and the claims taken from it.
pub fn mas_introspection(data: &[u8]) {
    if let Ok(i) = crate::mas::introspection::Introspection::parse(data, 0) {
        let _ = i.localpart(0);
        let _ = i.device();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// xorshift64*: the smoke's mutations are the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A few byte-level edits, as a fuzzer's first mutations.
    fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=rng.below(4) {
            match rng.below(6) {
                0 if !out.is_empty() => {
                    let i = rng.below(out.len());
                    out[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(out.len() + 1);
                    const BYTES: &[u8] = b"\0\"{}[]:,\\ \n\xff9-e";
                    out.insert(i, BYTES[rng.below(BYTES.len())]);
                }
                2 if !out.is_empty() => {
                    let i = rng.below(out.len());
                    out.remove(i);
                }
                3 => out.truncate(rng.below(out.len() + 1)),
                4 if !other.is_empty() => {
                    let (a, b) = (rng.below(other.len()), rng.below(other.len()));
                    let i = rng.below(out.len() + 1);
                    out.splice(i..i, other[a.min(b)..a.max(b)].iter().copied());
                }
                _ => {
                    let i = rng.below(out.len() + 1);
                    let dup = out[i..].to_vec();
                    out.extend_from_slice(&dup);
                }
            }
        }
        out
    }

    /// Every stored corpus input of every target, then 2,000 seeded
    /// mutations of them: the smoke of the fuzz targets.
    #[test]
    fn corpora_and_their_mutations_hold_the_invariants() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, target) in super::TARGETS {
            let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/fuzz_targets/{name}.rs"));
            let text = std::fs::read_to_string(&harness).unwrap_or_else(|e| panic!("{}: {e}", harness.display()));
            assert!(text.contains(&format!("fuzzing::{name}(")), "{} runs another target", harness.display());
            let dir = root.join(name);
            let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|f| std::fs::read(f.unwrap().path()).unwrap())
                .collect();
            inputs.sort();
            assert!(!inputs.is_empty(), "{name}: empty corpus");
            for input in &inputs {
                target(input);
            }
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
            for _ in 0..2_000 {
                let a = &inputs[rng.below(inputs.len())];
                let b = &inputs[rng.below(inputs.len())];
                target(&mutate(a, b, &mut rng));
            }
        }
    }
}
