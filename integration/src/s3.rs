//! Real S3 servers for the tests, on 127.0.0.1: moto (`moto_server`) and
//! s3s-fs, both installed by `scripts/s3-test-servers.sh`.
//!
//! [`MotoServer::start`] finds `moto_server` (`WALVAULT_MOTO_SERVER`, else
//! `${WALVAULT_S3_TOOLS:-/var/cache/walvault-test-tools}/moto/bin/moto_server`,
//! else `PATH`), starts it on a free port, waits until it answers and kills
//! it on drop. moto's conditional create is atomic; it accepts any
//! credentials and keeps its data in memory.
//!
//! [`S3sFsServer::start`] does the same for `s3s-fs` (`WALVAULT_S3S_FS`,
//! else `${WALVAULT_S3_TOOLS:-…}/s3s-fs/bin/s3s-fs`, else `PATH`): it
//! verifies SigV4 signatures against one access key and secret, and keeps
//! its data in a directory, so it can be stopped and started again on the
//! same port with nothing lost. Its conditional create is checked before
//! the write, not atomically: only sequential create-once holds there.
//!
//! When a server is missing, CI (`CI` set) fails; a developer's machine
//! skips with a reason. [`S3Server`] is what the tests use of either.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key the tests use; moto accepts any.
pub const ACCESS_KEY_ID: &str = "walvault-test-key";
/// The secret the tests use; moto accepts any.
pub const SECRET_ACCESS_KEY: &str = "walvault-test-secret-do-not-log";

/// What a test needs of an S3 server, whichever it is.
pub trait S3Server {
    /// The endpoint URL, `http://127.0.0.1:PORT`.
    fn endpoint(&self) -> String;

    /// Creates a bucket.
    fn create_bucket(&self, bucket: &str);

    /// A short name for messages (`moto`, `s3s-fs`).
    fn name(&self) -> &'static str;

    /// Writes a `credentials-file` for walvault into `dir` with the key
    /// and secret the server accepts, and returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    fn write_credentials(&self, dir: &Path) -> PathBuf {
        write_credentials_file(dir, ACCESS_KEY_ID, SECRET_ACCESS_KEY)
    }

    /// The `[s3]` table of a walvault configuration for this server.
    fn config_table(&self, credentials_file: &Path) -> String {
        config_table_for(&self.endpoint(), credentials_file, 10, 30)
    }
}

/// Writes a `credentials-file` holding `key_id` and `secret` into `dir`.
///
/// # Panics
/// When the file cannot be written.
pub fn write_credentials_file(dir: &Path, key_id: &str, secret: &str) -> PathBuf {
    let p = dir.join("s3-credentials.toml");
    std::fs::write(&p, format!("access-key-id = \"{key_id}\"\nsecret-access-key = \"{secret}\"\n"))
        .expect("write credentials");
    p
}

/// An `[s3]` table for `endpoint` with a request timeout and retry budget
/// in seconds.
pub fn config_table_for(endpoint: &str, credentials_file: &Path, timeout_secs: u64, budget_secs: u64) -> String {
    format!(
        "[s3]\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\npath-style = true\nallow-http = true\n\
         credentials-file = \"{}\"\nrequest-timeout = \"{timeout_secs}s\"\nretry-budget = \"{budget_secs}s\"\n",
        credentials_file.display()
    )
}

/// A running `moto_server`, killed on drop.
pub struct MotoServer {
    child: Child,
    port: u16,
}

/// Finds a server binary: `$env_var`, else `$WALVAULT_S3_TOOLS/rel`
/// (default `/var/cache/walvault-test-tools`), else `PATH`.
fn find_tool(env_var: &str, rel: &str, program: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var).map(PathBuf::from)
        && p.is_file()
    {
        return Some(p);
    }
    let tools = std::env::var_os("WALVAULT_S3_TOOLS")
        .map_or_else(|| PathBuf::from("/var/cache/walvault-test-tools"), PathBuf::from);
    let p = tools.join(rel);
    if p.is_file() {
        return Some(p);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

fn find_moto() -> Option<PathBuf> {
    find_tool("WALVAULT_MOTO_SERVER", "moto/bin/moto_server", "moto_server")
}

/// A free port on 127.0.0.1.
///
/// # Panics
/// When no port can be had.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
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
        let port = free_port();
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
        S3Server::endpoint(self)
    }

    /// Creates a bucket.
    ///
    /// # Panics
    /// When moto refuses.
    pub fn create_bucket(&self, bucket: &str) {
        S3Server::create_bucket(self, bucket);
    }

    /// Writes a `credentials-file` for walvault into `dir` and returns its
    /// path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_credentials(&self, dir: &Path) -> PathBuf {
        S3Server::write_credentials(self, dir)
    }

    /// The `[s3]` table of a walvault configuration for this server.
    pub fn config_table(&self, credentials_file: &Path) -> String {
        S3Server::config_table(self, credentials_file)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl S3Server for MotoServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn create_bucket(&self, bucket: &str) {
        let status = http(self.port, "PUT", &format!("/{bucket}")).expect("create bucket");
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    fn name(&self) -> &'static str {
        "moto"
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `s3s-fs`, serving the directory it was given, killed on drop
/// (the directory is left to its owner).
pub struct S3sFsServer {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    root: PathBuf,
}

impl S3sFsServer {
    /// Starts s3s-fs on a free port, serving `root` (created if needed)
    /// with [`ACCESS_KEY_ID`] and [`SECRET_ACCESS_KEY`], or returns `None`
    /// (after printing why) when it is not installed and `CI` is not set.
    ///
    /// # Panics
    /// When s3s-fs is missing under CI, or does not start within 60 s.
    pub fn start(root: &Path) -> Option<S3sFsServer> {
        let Some(bin) = find_tool("WALVAULT_S3S_FS", "s3s-fs/bin/s3s-fs", "s3s-fs") else {
            let why = "s3s-fs not found: run scripts/s3-test-servers.sh (or set WALVAULT_S3S_FS)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipping S3 test: {why}");
            return None;
        };
        std::fs::create_dir_all(root).expect("s3s-fs root");
        let mut server = S3sFsServer { child: None, port: free_port(), bin, root: root.to_path_buf() };
        server.start_again();
        Some(server)
    }

    /// Kills the server (as a crash would): the port refuses connections
    /// until [`S3sFsServer::start_again`]. The data stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same data, and
    /// waits until it answers.
    ///
    /// # Panics
    /// When it does not answer within 60 s.
    pub fn start_again(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut child = Command::new(&self.bin)
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", ACCESS_KEY_ID, "--secret-key", SECRET_ACCESS_KEY])
                .arg(&self.root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
            // Unsigned requests are refused (403), which is an answer.
            let answered = loop {
                if http(self.port, "GET", "/").is_ok() {
                    break true;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // The port may still be held by the previous process
                    // for a moment: try again.
                    break false;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} did not answer on port {} within 60 s",
                    self.bin.display(),
                    self.port
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            if answered {
                self.child = Some(child);
                return;
            }
            assert!(Instant::now() < deadline, "{} keeps exiting on port {}", self.bin.display(), self.port);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the data: one subdirectory per bucket.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl S3Server for S3sFsServer {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A bucket of s3s-fs is a directory under its root.
    fn create_bucket(&self, bucket: &str) {
        std::fs::create_dir(self.root.join(bucket)).expect("create bucket directory");
    }

    fn name(&self) -> &'static str {
        "s3s-fs"
    }
}

impl Drop for S3sFsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
