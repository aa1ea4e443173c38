//! Packaging where operators deploy: the systemd unit for Debian's
//! matrix-synapse layout (contrib/systemd/), the Kubernetes manifests and the
//! Element Server Suite values (contrib/kubernetes/), each checked with the
//! tools their platforms use or publish:
//!
//! - the unit: `systemd-analyze verify` and `systemd-analyze security`'s
//!   exposure score (Debian's systemd package; no running systemd needed),
//!   and its command line run for real, on the Debian layout, with writable
//!   and executable memory refused as `MemoryDenyWriteExecute=` refuses it;
//! - the manifests: kubernetes-validate (the Kubernetes API's JSON schemas,
//!   bundled, strict: unknown fields fail) and, for the Prometheus Operator's
//!   kinds, cloudcoil's models generated from the operator's CRDs (both from
//!   PyPI, in the test venv); how they refer to each other; the copies of the
//!   alert rules and the dashboard they carry;
//! - the ESS values: the shape the matrix-stack chart's schema gives
//!   `synapse.ingress.additionalPaths`, and the paths it then routes to us.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Ask, ServiceProcess, Synapse, TokenIn, env, http, unique};

const UNIT: &str = "contrib/systemd/synapse-keys-worker.service";
const KUBERNETES: &str = "contrib/kubernetes";
/// Where Debian's package puts Synapse's config, as the unit names it.
const DEBIAN_CONFIG_DIR: &str = "/etc/matrix-synapse/";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A YAML file of the repository as JSON values.
fn yaml(path: &str) -> Value {
    yaml_serde::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// The test venv's python (scripts/test.sh exports `SKW_TEST_VENV_BIN`).
fn venv_python() -> PathBuf {
    let dir = std::env::var("SKW_TEST_VENV_BIN").expect("SKW_TEST_VENV_BIN is not set: run the tests through `bash scripts/test.sh`");
    Path::new(&dir).join("python")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn both_streams(out: &Output) -> String {
    format!("status {}\nstdout:\n{}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ------------------------------------------------------------------ systemd ---

/// The unit's `Key=value` lines, with their section.
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{UNIT}: not Key=value: {line}"));
            settings.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    settings
}

fn unit_values(settings: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    settings.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.clone()).collect()
}

/// `--offline=true`'s last line: `→ Overall exposure level for X: 1.1 OK 🙂`.
fn exposure_score(report: &str) -> f64 {
    let line = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no score in:\n{report}"));
    let after = line.rsplit_once(": ").unwrap_or_else(|| panic!("cannot read {line:?}")).1;
    after.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("cannot read the score of {line:?}"))
}

#[test]
fn the_systemd_unit_parses_its_score() {
    assert_eq!(exposure_score("  x\n→ Overall exposure level for a.service: 1.1 OK 🙂\n"), 1.1);
    assert_eq!(exposure_score("→ Overall exposure level for a.service: 9.6 UNSAFE 😨"), 9.6);
}

/// `systemd-analyze verify` loads the unit as systemd would and says what it
/// cannot parse or find (on stderr; the exit status only for errors). It
/// needs no running systemd, but it does insist that ExecStart's binary
/// exists, so it reads a copy of the unit whose ExecStart is the binary
/// cargo built; `--man=no` keeps it from running man(1) (absent from a
/// fresh Debian), `--generators=no` from running the host's generators.
/// `security --offline=true` scores the sandbox from the file alone.
#[test]
fn the_systemd_unit_passes_verify_and_scores_at_most_2_5() {
    let text = read(UNIT);
    let settings = unit_settings(&text);
    let exec = unit_values(&settings, "Service", "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    assert!(exec[0].starts_with("/usr/bin/synapse-keys-worker "), "Debian's binary path: {}", exec[0]);
    for (section, key, want) in [
        ("Service", "User", "matrix-synapse"),
        ("Service", "Group", "matrix-synapse"),
        ("Unit", "PartOf", "matrix-synapse.target"),
        ("Install", "WantedBy", "matrix-synapse.target"),
        ("Service", "Restart", "on-failure"),
    ] {
        assert_eq!(unit_values(&settings, section, key), [want], "[{section}] {key}");
    }
    // It talks to remote homeservers and starts without its dependencies.
    for (section, key) in [("Service", "IPAddressDeny"), ("Unit", "Requires"), ("Unit", "BindsTo")] {
        assert_eq!(unit_values(&settings, section, key), Vec::<String>::new(), "[{section}] {key} is not wanted");
    }

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("synapse-keys-worker.service");
    let built =
        text.replace("ExecStart=/usr/bin/synapse-keys-worker ", &format!("ExecStart={} ", env!("CARGO_BIN_EXE_synapse-keys-worker")));
    assert_ne!(built, text);
    std::fs::write(&copy, built).unwrap();
    let verify = output(Command::new("systemd-analyze").args(["verify", "--man=no", "--generators=no"]).arg(&copy));
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let about_unit: Vec<&str> =
        stderr.lines().filter(|l| l.contains("synapse-keys-worker") || l.contains(&*dir.path().to_string_lossy())).collect();
    assert!(verify.status.success() && about_unit.is_empty(), "systemd-analyze verify:\n{}", both_streams(&verify));

    let security = output(Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(repo_file(UNIT)));
    assert!(security.status.success(), "systemd-analyze security:\n{}", both_streams(&security));
    let score = exposure_score(&String::from_utf8_lossy(&security.stdout));
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{}", String::from_utf8_lossy(&security.stdout));
}

/// Sets PR_SET_MDWE (Linux 6.3+: no memory both writable and executable,
/// and none made executable later, which systemd's MemoryDenyWriteExecute=
/// also refuses), inherited across exec, then runs argv[1:].
const WX_REFUSED_PY: &str = r#"
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed: {os.strerror(ctypes.get_errno())} (Linux 6.3 or later is needed)")
os.execv(sys.argv[1], sys.argv[1:])
"#;

fn wx_refused(program: &Path) -> Command {
    let mut cmd = Command::new(venv_python());
    cmd.arg("-c").arg(WX_REFUSED_PY).arg(program);
    cmd
}

/// The unit's command line, run as it is written (its config paths moved
/// from /etc/matrix-synapse into a temporary copy of Debian's layout: the
/// test world's homeserver.yaml, `server_name` again in conf.d/ as the
/// package writes it, and keys-worker.yaml, whose `keys_worker.listen` is
/// the only address given), under the W^X rule of `MemoryDenyWriteExecute=`:
/// it serves what Synapse serves. A W+X mapping under the same wrapper
/// fails, so the rule was in force.
#[tokio::test]
async fn the_systemd_unit_s_command_serves_with_write_xor_execute() {
    let mapping = output(wx_refused(&venv_python()).args(["-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"]));
    assert!(!mapping.status.success(), "a W+X mapping should be refused under the wrapper:\n{}", both_streams(&mapping));
    assert!(String::from_utf8_lossy(&mapping.stderr).contains("Permission denied"), "{}", both_streams(&mapping));

    let settings = unit_settings(&read(UNIT));
    let exec = unit_values(&settings, "Service", "ExecStart").pop().expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/synapse-keys-worker"));
    let dir = tempfile::tempdir().unwrap();
    let root = format!("{}/", dir.path().display());
    let args: Vec<String> = words
        .map(|w| {
            assert!(
                w.starts_with("--config-path=") && w.contains(DEBIAN_CONFIG_DIR),
                "ExecStart: {w} is not a config under {DEBIAN_CONFIG_DIR}"
            );
            w.replacen(DEBIAN_CONFIG_DIR, &root, 1)
        })
        .collect();
    assert_eq!(args.len(), 3, "homeserver.yaml, conf.d/, keys-worker.yaml: {exec}");
    std::fs::copy(&env().homeserver_yaml, dir.path().join("homeserver.yaml")).unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(dir.path().join("conf.d/server_name.yaml"), format!("server_name: {}\n", env().server_name)).unwrap();
    let port = crate::remote::closed_port().await;
    std::fs::write(dir.path().join("keys-worker.yaml"), format!("keys_worker:\n  listen: 127.0.0.1:{port}\n")).unwrap();

    let log = std::env::temp_dir().join(format!("{}.log", unique("unit")));
    let file = std::fs::File::create(&log).unwrap();
    let child = wx_refused(Path::new(env!("CARGO_BIN_EXE_synapse-keys-worker")))
        .args(&args)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut service = ServiceProcess { child, url: format!("http://127.0.0.1:{port}"), log };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = || std::fs::read_to_string(&service.log).unwrap_or_default();
        if let Some(status) = service.child.try_wait().unwrap() {
            panic!("the unit's command exited ({status}): {args:?}\n{}", log());
        }
        if http().get(format!("{}/ready", service.url)).send().await.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready within 20 s:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let hs = Synapse::new();
    let user = hs.register("unit").await;
    hs.upload_device_keys(&user.session).await;
    let ask = Ask::keys_query("v3", &user.session.token, TokenIn::Header, &json!({"device_keys": {&user.user_id: []}}));
    let (theirs, ours) = tokio::join!(ask.send(&env().synapse_url), ask.send(&service.url));
    assert_eq!(
        ours,
        theirs,
        "left: ours (the unit's command line), right: Synapse; log:\n{}",
        std::fs::read_to_string(&service.log).unwrap_or_default()
    );
    assert!(theirs.1["device_keys"][&user.user_id].as_object().is_some_and(|d| d.len() == 1), "{}", theirs.1);
}

// --------------------------------------------------------------- Kubernetes ---

/// Validates the manifests named in argv[1:]: each document of the
/// Prometheus Operator's kinds with cloudcoil's models (generated from the
/// operator's CRDs: required fields, types, patterns), any field the model
/// drops counting as unknown; every other one with kubernetes-validate,
/// strict, against the oldest and the newest Kubernetes schemas it bundles.
/// Prints [{file, kind, name, against, errors}].
const VALIDATE_PY: &str = r#"
import json, sys
import yaml
import kubernetes_validate
from kubernetes_validate.utils import all_versions
from cloudcoil.models.prometheus_operator import v1 as monitoring

CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): monitoring.ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): monitoring.PrometheusRule}
versions = sorted(set(all_versions()), key=lambda v: tuple(int(p) for p in v.split(".")))
k8s = [versions[0], versions[-1]]

def dropped(given, kept, path):
    out = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key in kept:
                out += dropped(value, kept[key], f"{path}.{key}")
            else:
                out.append(f"{path}.{key}: not a field of the CRD's schema")
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (g, k) in enumerate(zip(given, kept)):
            out += dropped(g, k, f"{path}[{i}]")
    elif given != kept:
        out.append(f"{path}: {given!r} read as {kept!r}")
    return out

results = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        errors, against = [], []
        model = CRDS.get((api, kind))
        if model is not None:
            against.append("prometheus-operator " + model.__module__)
            try:
                kept = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
                errors += dropped(doc, kept, "")
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        else:
            for version in k8s:
                against.append(f"Kubernetes {version}, strict")
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{version}: {'.'.join(str(p) for p in e.path)}: {e.message}")
                except Exception as e:
                    errors.append(f"{version}: {type(e).__name__}: {getattr(e, 'message', e)}")
        name = (doc.get("metadata") or {}).get("name")
        results.append({"file": path, "kind": kind, "name": name, "against": against, "errors": errors})
json.dump(results, sys.stdout)
"#;

struct Verdict {
    file: String,
    kind: String,
    against: Vec<String>,
    errors: Vec<String>,
}

fn validate_manifests(files: &[PathBuf]) -> Vec<Verdict> {
    let out = output(Command::new(venv_python()).arg("-c").arg(VALIDATE_PY).args(files).stdin(Stdio::null()));
    assert!(out.status.success(), "the manifest validator failed:\n{}", both_streams(&out));
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let strings = |v: &Value| v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    results
        .iter()
        .map(|r| Verdict {
            file: r["file"].as_str().unwrap().to_owned(),
            kind: r["kind"].as_str().unwrap_or_default().to_owned(),
            against: strings(&r["against"]),
            errors: strings(&r["errors"]),
        })
        .collect()
}

/// kustomization.yaml's resources: every manifest of the directory, no more.
fn kustomize_resources() -> Vec<String> {
    let k = yaml(&format!("{KUBERNETES}/kustomization.yaml"));
    assert_eq!((k["apiVersion"].as_str(), k["kind"].as_str()), (Some("kustomize.config.k8s.io/v1beta1"), Some("Kustomization")));
    let listed: Vec<String> = k["resources"].as_array().expect("resources").iter().map(|r| r.as_str().unwrap().to_owned()).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo_file(KUBERNETES))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml" && n != "ess-values.yaml")
        .collect();
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), on_disk, "kustomization.yaml's resources vs the directory");
    assert_eq!(listed.len(), on_disk.len(), "a resource listed twice: {listed:?}");
    listed
}

/// contrib/kubernetes/`file`, a `kind`.
fn manifest(file: &str, kind: &str) -> Value {
    let doc = yaml(&format!("{KUBERNETES}/{file}"));
    assert_eq!(doc["kind"], kind, "{file}");
    doc
}

fn labels_select(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.as_object().filter(|s| !s.is_empty());
    wanted.is_some_and(|w| w.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let files: Vec<PathBuf> = kustomize_resources().iter().map(|f| repo_file(&format!("{KUBERNETES}/{f}"))).collect();
    let verdicts = validate_manifests(&files);
    let kinds: BTreeSet<&str> = verdicts.iter().map(|v| v.kind.as_str()).collect();
    let want: BTreeSet<&str> = ["ConfigMap", "Deployment", "PodDisruptionBudget", "PrometheusRule", "Service", "ServiceMonitor"].into();
    assert_eq!(kinds, want);
    for v in &verdicts {
        assert!(
            !v.against.is_empty() && v.errors.is_empty(),
            "{} ({}) against {:?}:\n  {}",
            v.file,
            v.kind,
            v.against,
            v.errors.join("\n  ")
        );
    }

    // The validator fails what it should: a misspelt field of a core kind,
    // a field the CRD does not have, a rule without its expression.
    let dir = tempfile::tempdir().unwrap();
    let broken = [
        ("deployment.yaml", "readinessProbe:", "readinesProbe:", "'readinesProbe' was unexpected"),
        ("servicemonitor.yaml", "scrapeTimeout:", "scrapeTimout:", "scrapeTimout: not a field"),
        ("prometheusrule.yaml", "expr: synapse_keys_worker_caches_trusted == 0", "labels: {}", "expr\n  Field required"),
    ];
    let copies: Vec<PathBuf> = broken
        .iter()
        .map(|(file, from, to, _)| {
            let text = read(&format!("{KUBERNETES}/{file}"));
            assert!(text.contains(from), "{file} has no {from:?}");
            let copy = dir.path().join(file);
            std::fs::write(&copy, text.replacen(from, to, 1)).unwrap();
            copy
        })
        .collect();
    for ((file, _, _, why), v) in broken.iter().zip(validate_manifests(&copies)) {
        assert!(v.errors.iter().any(|e| e.contains(why)), "a broken {file} should fail with {why:?}: {:?}", v.errors);
    }

    // How they refer to each other.
    let deployment = manifest("deployment.yaml", "Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["replicas"], 2);
    assert!(labels_select(&spec["selector"]["matchLabels"], labels));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["ports"], json!([{"name": "http", "containerPort": 8585, "protocol": "TCP"}]), "the image's port (Dockerfile)");
    assert_eq!((&c["readinessProbe"]["httpGet"]["path"], &c["readinessProbe"]["httpGet"]["port"]), (&json!("/ready"), &json!("http")));
    assert_eq!((&c["livenessProbe"]["httpGet"]["path"], &c["livenessProbe"]["httpGet"]["port"]), (&json!("/health"), &json!("http")));
    for key in ["requests", "limits"] {
        assert!(c["resources"][key]["memory"].is_string(), "resources.{key}.memory");
    }
    // Every config path lies in a mounted volume; the ConfigMap's holds the file.
    let mounts = c["volumeMounts"].as_array().unwrap();
    let configmap = manifest("configmap.yaml", "ConfigMap");
    for arg in c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()) {
        let path = arg.strip_prefix("--config-path=").unwrap_or_else(|| panic!("args: {arg}"));
        let mount = mounts.iter().find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())));
        let mount = mount.unwrap_or_else(|| panic!("{path} is in no volume mount: {mounts:?}"));
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).expect("the mount's volume");
        if volume["configMap"]["name"] == configmap["metadata"]["name"] {
            let file = path.rsplit('/').next().unwrap();
            assert!(configmap["data"][file].is_string(), "configmap.yaml has no {file}");
            let parsed: Value = yaml_serde::from_str(configmap["data"][file].as_str().unwrap()).unwrap();
            assert!(parsed["keys_worker"].is_object(), "{file} holds the keys_worker section: {parsed}");
        }
    }

    let service = manifest("service.yaml", "Service");
    assert!(labels_select(&service["spec"]["selector"], labels), "the Service selects the pods");
    assert_eq!(service["spec"]["ports"], json!([{"name": "http", "port": 8585, "targetPort": "http", "protocol": "TCP"}]));
    let pdb = manifest("pdb.yaml", "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(labels_select(&pdb["spec"]["selector"]["matchLabels"], labels), "the PodDisruptionBudget covers the pods");
    let monitor = manifest("servicemonitor.yaml", "ServiceMonitor");
    assert!(
        labels_select(&monitor["spec"]["selector"]["matchLabels"], &service["metadata"]["labels"]),
        "the ServiceMonitor finds the Service"
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

/// Where two JSON values differ, as paths (the first few).
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        _ if out.len() >= 5 => {}
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                differences(x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null), &format!("{path}.{key}"), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                differences(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

fn assert_same(ours: &Value, theirs: &Value, what: &str) {
    let mut found = Vec::new();
    differences(ours, theirs, "", &mut found);
    assert!(found.is_empty(), "{what} (its header says how to make it again):\n  {}", found.join("\n  "));
}

#[test]
fn the_prometheus_rule_carries_the_alert_rules_unchanged() {
    let rule = manifest("prometheusrule.yaml", "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = yaml("contrib/prometheus/alerts.yml");
    assert!(alerts["groups"].as_array().is_some_and(|g| !g.is_empty()), "alerts.yml has groups");
    assert_same(&rule["spec"]["groups"], &alerts["groups"], "prometheusrule.yaml's spec.groups differs from alerts.yml's groups");
    assert_eq!(rule["spec"].as_object().unwrap().len(), 1, "spec holds groups only");
}

#[test]
fn the_dashboard_configmap_carries_the_dashboard_unchanged() {
    let dashboards: Vec<Value> = kustomize_resources()
        .iter()
        .map(|f| yaml(&format!("{KUBERNETES}/{f}")))
        .filter(|d| d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(dashboards.len(), 1, "one ConfigMap labelled grafana_dashboard: \"1\" (a string, as the sidecar matches it)");
    let data = dashboards[0]["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["synapse-keys-worker.json"]);
    let embedded = data["synapse-keys-worker.json"].as_str().unwrap();
    let file = read("contrib/grafana/synapse-keys-worker.json");
    let parse = |text: &str, what: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{what} is not JSON: {e}"));
    let (ours, theirs) = (parse(embedded, "dashboard-configmap.yaml's dashboard"), parse(&file, "the dashboard"));
    assert_same(&ours, &theirs, "dashboard-configmap.yaml's dashboard differs from contrib/grafana's");
    assert_eq!(embedded, file, "the same JSON, written differently");
}

// ---------------------------------------------------------------------- ESS ---

/// One entry of matrix-stack's `synapse.ingress.additionalPaths`, as the
/// chart's charts/matrix-stack/source/synapse/ingress_with_additional_paths.json
/// shapes it: `path` and `availability` (internally_and_externally,
/// only_externally, blocked) required; `service` {name, port: {name} or
/// {number}, exactly one} required unless blocked.
struct AdditionalPath {
    path: String,
    availability: String,
    service: Option<(String, String)>,
}

fn additional_paths(values: &Value) -> Vec<AdditionalPath> {
    let entries = values["synapse"]["ingress"]["additionalPaths"].as_array().expect("synapse.ingress.additionalPaths is a list");
    entries
        .iter()
        .map(|e| {
            let keys: BTreeSet<&str> = e.as_object().expect("an entry is a mapping").keys().map(String::as_str).collect();
            assert!(keys.is_subset(&["path", "availability", "service"].into()), "unknown keys: {e}");
            let path = e["path"].as_str().unwrap_or_else(|| panic!("path is a string: {e}")).to_owned();
            let availability = e["availability"].as_str().unwrap_or_else(|| panic!("availability is a string: {e}")).to_owned();
            assert!(["internally_and_externally", "only_externally", "blocked"].contains(&availability.as_str()), "availability: {e}");
            let service = e.get("service").map(|s| {
                let name = s["name"].as_str().unwrap_or_else(|| panic!("service.name: {e}")).to_owned();
                let port = match (&s["port"]["name"], &s["port"]["number"]) {
                    (Value::String(n), Value::Null) => n.clone(),
                    (Value::Null, Value::Number(n)) if n.is_u64() => n.to_string(),
                    _ => panic!("service.port has exactly one of name (a string) and number (an integer): {e}"),
                };
                (name, port)
            });
            assert!(service.is_some() || availability == "blocked", "service is needed to route: {e}");
            AdditionalPath { path, availability, service }
        })
        .collect()
}

/// Where the chart sends `request`: only_externally and blocked entries
/// become paths of Synapse's Ingress (pathType Prefix: whole path elements,
/// the longest wins); internally_and_externally ones HAProxy's `path_beg`
/// (a string prefix), for requests that get past the Ingress to HAProxy.
fn routed<'a>(paths: &'a [AdditionalPath], request: &str) -> Option<&'a AdditionalPath> {
    let element_prefix = |p: &str| {
        let p = p.trim_end_matches('/');
        request == p || request.starts_with(&format!("{p}/"))
    };
    let ingress =
        paths.iter().filter(|a| a.availability != "internally_and_externally" && element_prefix(&a.path)).max_by_key(|a| a.path.len());
    ingress.or_else(|| paths.iter().find(|a| a.availability == "internally_and_externally" && request.starts_with(&a.path)))
}

#[test]
fn the_ess_values_route_keys_query() {
    let values = yaml(&format!("{KUBERNETES}/ess-values.yaml"));
    let paths = additional_paths(&values);
    // The chart names one HAProxy backend per internally_and_externally
    // entry after its service and port: two alike make HAProxy refuse its config.
    let backends: Vec<_> = paths.iter().filter(|a| a.availability == "internally_and_externally").map(|a| a.service.clone()).collect();
    assert_eq!(backends.len(), backends.iter().collect::<BTreeSet<_>>().len(), "HAProxy backends named twice");

    let service = manifest("service.yaml", "Service");
    let ours = service["metadata"]["name"].as_str().unwrap();
    let ports: Vec<&str> = service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for version in ["v3", "r0", "unstable"] {
        let request = format!("/_matrix/client/{version}/keys/query");
        let entry = routed(&paths, &request).unwrap_or_else(|| panic!("{request} is not routed"));
        let (name, port) = entry.service.as_ref().unwrap_or_else(|| panic!("{request} is blocked"));
        assert_eq!(name, ours, "{request} goes to service.yaml's Service");
        assert!(ports.contains(&port.as_str()), "{request}: the Service has no port {port}: {ports:?}");
    }
    for other in [
        "/_matrix/client/v3/keys/claim",
        "/_matrix/client/v3/keys/upload",
        "/_matrix/client/v3/keys/changes",
        "/_matrix/client/v3/keys/queryx",
        "/_matrix/client/v3/sync",
    ] {
        assert!(routed(&paths, other).is_none(), "{other} should stay with Synapse");
    }
}

#[test]
fn the_ess_route_model_reads_the_chart_as_written() {
    let entry = |path: &str, availability: &str| AdditionalPath { path: path.into(), availability: availability.into(), service: None };
    let paths = [entry("/_matrix/client/v3/keys/query", "only_externally"), entry("/_synapse/x", "internally_and_externally")];
    assert!(routed(&paths, "/_matrix/client/v3/keys/query").is_some());
    assert!(routed(&paths, "/_matrix/client/v3/keys/query/more").is_some(), "a Prefix path covers what lies below it");
    assert!(routed(&paths, "/_matrix/client/v3/keys/queryx").is_none(), "a Prefix path matches whole elements");
    assert!(routed(&paths, "/_synapse/xy").is_some(), "HAProxy's path_beg is a string prefix");
    let values = json!({"synapse": {"ingress": {"additionalPaths": [{"path": "/a", "availability": "blocked"}]}}});
    assert_eq!(additional_paths(&values).len(), 1);
    for bad in [
        json!({"path": "/a", "availability": "sometimes", "service": {"name": "s", "port": {"name": "http"}}}),
        json!({"path": "/a", "availability": "only_externally", "service": {"name": "s", "port": {"name": "http", "number": 1}}}),
        json!({"path": "/a", "availability": "only_externally"}),
        json!({"path": "/a", "availability": "blocked", "pathType": "Exact"}),
    ] {
        let values = json!({"synapse": {"ingress": {"additionalPaths": [bad.clone()]}}});
        assert!(std::panic::catch_unwind(|| additional_paths(&values)).is_err(), "{bad} should be refused");
    }
}
