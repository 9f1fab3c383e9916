//! The S3 side of the S3 benchmark: a local S3 server (s3s-fs or moto) on a
//! plain-HTTP port, a TLS terminator (stunnel) in front of it with a
//! throw-away certificate authority, and a small boto3 helper that creates
//! buckets and lists what they hold. Every process started here is killed
//! when its guard is dropped, on error too.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ctx::{Ctx, describe, run};

/// Access key of the benchmark's own S3 server (accepted by moto, configured
/// into s3s-fs). Not a secret: the server lives only as long as the run.
pub const ACCESS_KEY_ID: &str = "walvault-bench-key";
/// Secret key of the benchmark's own S3 server; never printed.
pub const SECRET_ACCESS_KEY: &str = "walvault-bench-secret";
/// The region every client is told.
pub const REGION: &str = "us-east-1";
/// The bucket every tool writes into (each under its own prefix).
pub const BUCKET: &str = "bench";

/// Where `scripts/s3-test-servers.sh` installs s3s-fs.
pub const S3S_FS: &str = "/var/cache/walvault-test-tools/s3s-fs/bin/s3s-fs";
/// Where `scripts/s3-test-servers.sh` installs moto.
pub const MOTO: &str = "/var/cache/walvault-test-tools/moto/bin/moto_server";

/// Which S3 server implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// s3s-fs: Rust, objects as files in a directory.
    S3sFs,
    /// moto: Python, objects in memory.
    Moto,
}

/// A child process killed (and reaped) on drop.
struct Guard {
    what: String,
    child: Child,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("walvault-bench-s3: warning: unable to stop {}: {e}", self.what);
        }
        let _ = self.child.wait();
    }
}

/// The running S3 server, its TLS terminator and their endpoints.
pub struct S3Env {
    /// Which server runs.
    pub flavor: Flavor,
    /// The server program.
    pub program: PathBuf,
    /// `http://127.0.0.1:PORT`: the server itself.
    pub http: String,
    /// Port of stunnel, which forwards TLS connections to the server.
    pub tls_port: u16,
    /// The certificate of the throw-away CA that signed stunnel's
    /// certificate; clients are told to trust it.
    pub ca: PathBuf,
    /// `<work>/s3-credentials.toml` for walvault (mode 0600, PostgreSQL user).
    pub credentials: PathBuf,
    helper: PathBuf,
    // Declared last: dropped after the fields above, stunnel first.
    _stunnel: Guard,
    _server: Guard,
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it
/// right after).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("unable to find a free TCP port on 127.0.0.1")?;
    Ok(l.local_addr().context("unable to read the address of a bound socket")?.port())
}

/// Whether something answers HTTP on `port` (any status).
fn answers_http(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    s.read(&mut buf).is_ok_and(|n| n >= 5 && &buf[..5] == b"HTTP/")
}

/// Waits until `ready()` holds, or fails naming `what` and its log.
fn wait_for(what: &str, guard: &mut Guard, log: &Path, ready: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        if let Ok(Some(status)) = guard.child.try_wait() {
            bail!("{what} exited with {status} before it answered; see '{}'", log.display());
        }
        if Instant::now() > deadline {
            bail!("{what} did not answer within 60 s; see '{}'", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Guard> {
    let shown = describe(&cmd);
    let out = fs::File::create(log).with_context(|| format!("unable to create '{}'", log.display()))?;
    let err = out.try_clone().with_context(|| format!("unable to reopen '{}'", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("unable to start {what}: '{shown}'"))?;
    Ok(Guard { what: what.to_string(), child })
}

/// Picks the S3 server: `explicit` if given, else s3s-fs if installed,
/// else moto.
pub fn choose_server(explicit: Option<&Path>) -> Result<(Flavor, PathBuf)> {
    let program = match explicit {
        Some(p) => p.to_path_buf(),
        None if Path::new(S3S_FS).is_file() => PathBuf::from(S3S_FS),
        None if Path::new(MOTO).is_file() => PathBuf::from(MOTO),
        None => bail!(
            "no S3 server found ('{S3S_FS}' nor '{MOTO}'); install one with scripts/s3-test-servers.sh \
             or name one with --s3-server"
        ),
    };
    if !program.is_file() {
        bail!("the S3 server '{}' does not exist", program.display());
    }
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let flavor = if name.contains("moto") { Flavor::Moto } else { Flavor::S3sFs };
    Ok((flavor, program))
}

/// Makes a CA and a certificate for `IP:127.0.0.1` signed by it, in
/// `dir`. A separate CA (rather than one self-signed certificate) because
/// rustls refuses a CA certificate as a server's own certificate.
fn make_certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let openssl = |args: &[&str]| {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(dir).stdin(Stdio::null());
        run(cmd).context("openssl failed (install it with scripts/bench-deps.sh)")
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=walvault-bench CA",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    let ext = dir.join("server.ext");
    fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nkeyUsage=digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .with_context(|| format!("unable to write '{}'", ext.display()))?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    let ca = dir.join("ca.pem");
    // The clients run as the PostgreSQL user and must read the CA.
    fs::set_permissions(&ca, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("unable to make '{}' readable", ca.display()))?;
    Ok((ca, dir.join("server.pem"), dir.join("server.key")))
}

/// The boto3 helper: `create BUCKET` and `list BUCKET PREFIX` (prints
/// `SIZE KEY` per object). boto3 comes with barman-cli-cloud.
const HELPER: &str = r#"import sys
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name=sys.argv[2],
                  config=Config(s3={"addressing_style": "path"}))
if sys.argv[3] == "create":
    s3.create_bucket(Bucket=sys.argv[4])
elif sys.argv[3] == "list":
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[4], Prefix=sys.argv[5]):
        for o in page.get("Contents", []):
            print(o["Size"], o["Key"])
"#;

impl S3Env {
    /// Starts the server on a free port, stunnel in front of it, creates
    /// [`BUCKET`] and writes walvault's credentials file.
    pub fn start(ctx: &Ctx, flavor: Flavor, program: &Path) -> Result<S3Env> {
        let dir = ctx.path("s3");
        fs::create_dir_all(&dir).with_context(|| format!("unable to create '{}'", dir.display()))?;
        let port = free_port()?;
        let log = dir.join("server.log");
        let mut cmd = Command::new(program);
        match flavor {
            Flavor::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            }
            Flavor::S3sFs => {
                let data = dir.join("data");
                fs::create_dir_all(&data).with_context(|| format!("unable to create '{}'", data.display()))?;
                cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY_ID, "--secret-key", SECRET_ACCESS_KEY])
                    .arg(&data);
            }
        }
        let mut server = spawn("the S3 server", cmd, &log)?;
        wait_for("the S3 server", &mut server, &log, || answers_http(port))?;

        let (ca, cert, key) = make_certificates(&dir)?;
        let tls_port = free_port()?;
        let conf = dir.join("stunnel.conf");
        fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\ndebug = warning\n\n[s3]\naccept = 127.0.0.1:{tls_port}\n\
                 connect = 127.0.0.1:{port}\ncert = {}\nkey = {}\n",
                cert.display(),
                key.display()
            ),
        )
        .with_context(|| format!("unable to write '{}'", conf.display()))?;
        let stunnel_log = dir.join("stunnel.log");
        let mut cmd = Command::new("stunnel4");
        cmd.arg(&conf);
        let mut stunnel = spawn("stunnel", cmd, &stunnel_log)?;
        wait_for("stunnel", &mut stunnel, &stunnel_log, || TcpStream::connect(("127.0.0.1", tls_port)).is_ok())?;

        let helper = dir.join("s3util.py");
        fs::write(&helper, HELPER).with_context(|| format!("unable to write '{}'", helper.display()))?;
        let credentials = ctx.path("s3-credentials.toml");
        fs::write(
            &credentials,
            format!("access-key-id = \"{ACCESS_KEY_ID}\"\nsecret-access-key = \"{SECRET_ACCESS_KEY}\"\n"),
        )
        .with_context(|| format!("unable to write '{}'", credentials.display()))?;
        fs::set_permissions(&credentials, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("unable to restrict '{}'", credentials.display()))?;
        ctx.chown(&credentials)?;

        let env = S3Env {
            flavor,
            program: program.to_path_buf(),
            http: format!("http://127.0.0.1:{port}"),
            tls_port,
            ca,
            credentials,
            helper,
            _stunnel: stunnel,
            _server: server,
        };
        env.boto(&["create", BUCKET]).context("unable to create the benchmark's bucket")?;
        Ok(env)
    }

    /// `https://127.0.0.1:TLS_PORT`: through stunnel.
    pub fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.tls_port)
    }

    /// Sets the AWS environment variables (credentials, region) on `cmd`.
    pub fn aws_env(&self, cmd: &mut Command) {
        cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_DEFAULT_REGION", REGION);
    }

    fn boto(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("python3");
        cmd.arg(&self.helper).arg(&self.http).arg(REGION).args(args).stdin(Stdio::null());
        self.aws_env(&mut cmd);
        run(cmd)
    }

    /// Every object under `prefix` in [`BUCKET`]: (key, size).
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let out = self.boto(&["list", BUCKET, prefix])?;
        out.lines()
            .map(|l| {
                let (size, key) = l.split_once(' ').with_context(|| format!("unexpected listing line '{l}'"))?;
                Ok((key.to_string(), size.parse().with_context(|| format!("unexpected size in '{l}'"))?))
            })
            .collect()
    }

    /// The server's version line, for the report.
    pub fn version(&self) -> String {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--version").stdin(Stdio::null());
        let name = match self.flavor {
            Flavor::S3sFs => "s3s-fs",
            Flavor::Moto => "moto",
        };
        match cmd.output() {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
                format!("{name}: {}", text.lines().next().unwrap_or("").trim())
            }
            Err(e) => format!("{name}: version unknown ({e})"),
        }
    }
}
