//! nginx (the Debian package's binary) in front of our service and Synapse,
//! routed by the README's own `location` block, with an access log of path,
//! upstream and status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{env, eventually_some};

/// Where the README's example sends `/keys/query`; the test puts our
/// service's address in its place.
const README_UPSTREAM: &str = "http://127.0.0.1:8585";

/// The README's nginx block that routes `/keys/query`, as written there.
pub fn readme_keys_location() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).expect("README.md");
    readme
        .split("```nginx\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("/keys/query"))
        .expect("README.md has an nginx block routing /keys/query")
        .to_owned()
}

/// One line of the access log.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// `$upstream_addr`: `127.0.0.1:port` of whoever answered.
    pub upstream: String,
}

/// A running nginx; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Nginx {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl Nginx {
    /// nginx on a free loopback port: the README's `/keys/query` block
    /// pointed at `worker` (`127.0.0.1:port`), everything else to
    /// `synapse` (a base URL). Its files live in a directory of its own
    /// under the world's state directory.
    pub async fn start(worker: &str, synapse: &str) -> Self {
        let bin = env("SKW_TEST_NGINX");
        assert!(!bin.is_empty(), "nginx is not installed: run `bash scripts/install.sh system`");
        let dir = tempdir_in(&PathBuf::from(env("SKW_TEST_STATE_DIR")), "nginx");
        let port = free_port();
        let keys = readme_keys_location();
        assert!(keys.contains(README_UPSTREAM), "the README's block proxies to {README_UPSTREAM}:\n{keys}");
        let keys = keys.replace(README_UPSTREAM, &format!("http://{worker}"));
        let d = dir.display();
        // Running as root, nginx would switch its workers to `nobody`,
        // which cannot enter the state directory; keep them as root then.
        let user = if running_as_root() { "user root;" } else { "" };
        let conf = format!(
            "{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format skw '$request_method $uri $status $upstream_addr';
    access_log {d}/access.log skw;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 50m;
    server {{
        listen 127.0.0.1:{port};
{keys}
        location / {{
            proxy_pass {synapse};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(&bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let mut nginx = Nginx { child, url: format!("http://127.0.0.1:{port}"), dir };
        nginx.wait_ready().await;
        nginx
    }

    /// Polls Synapse's `/versions` through nginx until it answers 200.
    async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let url = format!("{}/_matrix/client/versions", self.url);
        let dir = self.dir.clone();
        let child = &mut self.child;
        eventually_some("nginx serving", Duration::from_secs(10), || {
            if let Some(status) = child.try_wait().expect("nginx status") {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}):\n{log}");
            }
            let get = http.get(&url).send();
            async move { get.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
    }

    /// The access log so far (nginx writes each line when the request ends).
    pub fn hits(&self) -> Vec<Hit> {
        let log = std::fs::read_to_string(self.dir.join("access.log")).expect("access.log");
        log.lines().map(|line| parse_hit(line).unwrap_or_else(|| panic!("unexpected access log line {line:?}"))).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: nginx's fast shutdown, which stops its worker too.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn parse_hit(line: &str) -> Option<Hit> {
    let mut fields = line.split(' ');
    let hit = Hit {
        method: fields.next()?.to_owned(),
        path: fields.next()?.to_owned(),
        status: fields.next()?.parse().ok()?,
        upstream: fields.next()?.to_owned(),
    };
    fields.next().is_none().then_some(hit)
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process' effective user.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self")) == 0
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("its address").port()
}

/// A fresh directory named `<prefix>-<pid>-<n>` under `parent`.
fn tempdir_in(parent: &Path, prefix: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}
