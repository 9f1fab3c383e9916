//! A real S3 server for the tests: moto (`moto_server`) on 127.0.0.1.
//!
//! [`MotoServer::start`] finds `moto_server` (`WALVAULT_MOTO_SERVER`, else
//! `${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}/moto/bin/moto_server`
//! as installed by `scripts/s3-test-servers.sh`, else `PATH`), starts it on a
//! free port, waits until it answers and kills it on drop. When moto is
//! missing, CI (`CI` set) fails; a developer's machine skips with a reason.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the tests use; moto accepts any.
pub const ACCESS_KEY_ID: &str = "walvault-test-key";
/// The secret the tests use; moto accepts any.
pub const SECRET_ACCESS_KEY: &str = "walvault-test-secret-do-not-log";

/// A running `moto_server`, killed on drop.
pub struct MotoServer {
    child: Child,
    port: u16,
}

fn find_moto() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WALVAULT_MOTO_SERVER").map(PathBuf::from)
        && p.is_file()
    {
        return Some(p);
    }
    let tools = std::env::var_os("WALVAULT_S3_TOOLS")
        .map_or_else(|| PathBuf::from("/var/cache/walvault-test-tools"), PathBuf::from);
    let p = tools.join("moto/bin/moto_server");
    if p.is_file() {
        return Some(p);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("moto_server")).find(|p| p.is_file())
}

/// One HTTP/1.1 request without a body; returns the status code.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {resp:.80}")))
}

impl MotoServer {
    /// Starts moto, or returns `None` (after printing why) when it is not
    /// installed and `CI` is not set.
    ///
    /// # Panics
    /// When moto is missing under CI, or does not start within 60 s.
    pub fn start() -> Option<MotoServer> {
        let Some(bin) = find_moto() else {
            let why = "moto_server not found: run scripts/s3-test-servers.sh (or set WALVAULT_MOTO_SERVER)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping S3 test: {why}");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut server = MotoServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http(port, "GET", "/moto-api/").is_ok() {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{} exited with {status} before answering", bin.display());
            }
            assert!(Instant::now() < deadline, "{} did not answer on port {port} within 60 s", bin.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    /// The endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket.
    ///
    /// # Panics
    /// When moto refuses.
    pub fn create_bucket(&self, bucket: &str) {
        let status = http(self.port, "PUT", &format!("/{bucket}")).expect("create bucket");
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// Writes a `credentials-file` for walvault into `dir` and returns its
    /// path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_credentials(&self, dir: &Path) -> PathBuf {
        let p = dir.join("s3-credentials.toml");
        std::fs::write(
            &p,
            format!("access-key-id = \"{ACCESS_KEY_ID}\"\nsecret-access-key = \"{SECRET_ACCESS_KEY}\"\n"),
        )
        .expect("write credentials");
        p
    }

    /// The `[s3]` table of a walvault configuration for this server.
    pub fn config_table(&self, credentials_file: &Path) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\npath-style = true\nallow-http = true\n\
             credentials-file = \"{}\"\nrequest-timeout = \"10s\"\nretry-budget = \"30s\"\n",
            self.endpoint(),
            credentials_file.display()
        )
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
