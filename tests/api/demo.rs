//! The first minute: `synapse-keys-worker` with no config serves the demo,
//! prints what a newcomer needs (what it serves, the request to paste,
//! where the metrics are) and nothing else, and the printed request works.

use std::time::Duration;

use crate::helpers::{eventually, eventually_some, http};

#[tokio::test]
async fn the_demo_says_only_what_a_newcomer_needs_and_its_curl_works() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-keys-worker"))
        .env("SYNAPSE_KEYS_WORKER_LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    eventually(Duration::from_secs(30), || std::future::ready(read(&out).contains("Stop: Ctrl-C"))).await;
    let text = read(&out);

    // The request to paste, taken apart as a shell would.
    let url = text.split('\'').find(|s| s.starts_with("http://") && s.ends_with("/keys/query")).expect("the curl names the URL");
    let token = text.split("Bearer ").nth(1).and_then(|t| t.split('\'').next()).expect("the curl carries a token");
    let body = text.split("-d '").nth(1).and_then(|b| b.split('\'').next()).expect("the curl has a body");
    let resp = http().post(url).bearer_auth(token).body(body.to_owned()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert!(answer["device_keys"]["@alice:demo.localhost"]["ALICEDEV1"].is_object(), "{answer}");
    assert!(answer["master_keys"]["@bob:demo.localhost"].is_object(), "{answer}");

    let metrics = text.split("Metrics: ").nth(1).and_then(|m| m.split_whitespace().next()).expect("the metrics URL is given");
    assert_eq!(http().get(metrics).send().await.unwrap().status(), 200);

    // Nothing else: no warnings about federation or writers the demo does
    // not use, no log lines (the request above made none either).
    let _ = child.kill();
    let _ = child.wait();
    let (text, logs) = (read(&out), read(&err));
    assert!(logs.trim().is_empty(), "the demo logged: {logs}");
    assert!(!text.contains("WARN") && !text.contains("signing_key_path") && !text.contains("instance_map"), "{text}");
    assert_eq!(text.lines().filter(|l| !l.trim().is_empty()).count(), 7, "only the introduction: {text}");
}

/// Options without a config are a mistake, not the demo; the demo never
/// listens beyond loopback. Each is one line and a failed exit, at once.
#[tokio::test]
async fn without_a_config_only_no_arguments_run_the_demo() {
    async fn run(args: &[&str], listen: Option<&str>) -> (bool, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_synapse-keys-worker"));
        cmd.args(args).env_remove("SYNAPSE_KEYS_WORKER_LISTEN");
        if let Some(l) = listen {
            cmd.env("SYNAPSE_KEYS_WORKER_LISTEN", l);
        }
        let out_file = std::fs::File::create(&out).unwrap();
        // One that serves instead of exiting is killed when the wait fails.
        let mut child = KillOnDrop(cmd.stdout(out_file).stderr(std::fs::File::create(&err).unwrap()).spawn().unwrap());
        let status = eventually_some(Duration::from_secs(10), || std::future::ready(child.0.try_wait().unwrap())).await;
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        (!status.success(), read(&out), read(&err))
    }
    let (failed, out, err) = run(&["--listen", "0.0.0.0:0"], None).await;
    assert!(failed && out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no config file given") && err.contains("-c"), "{err}");

    let (failed, out, err) = run(&[], Some("0.0.0.0:0")).await;
    assert!(failed && out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("only on loopback"), "{err}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
