//! A fault-injecting HTTP proxy on 127.0.0.1, in front of a real S3 server,
//! for the S3 fault tests.
//!
//! [`FaultProxy::start`] listens on a free port and forwards each HTTP/1.1
//! request to the upstream port on a fresh connection. Its [`Mode`] can be
//! switched at any time: pass requests through, delay every response, drop
//! every connection without an answer, answer 503 to the next N requests,
//! or strip `If-None-Match` from requests (a store that ignores conditional
//! create, as Garage 2.5 does). [`FaultProxy::stop`] closes the port (a
//! stopped server) and [`FaultProxy::resume`] opens it again.
//!
//! `object_store` signs `If-None-Match` (SigV4 signs every header but
//! `authorization`, `content-length` and `user-agent`), so stripping it
//! breaks the signature on a server that verifies it: use that mode in
//! front of moto, which does not.
//!
//! Plain std threads; nothing here outlives the proxy: [`Drop`] stops it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the proxy does with the requests it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward requests and responses unchanged.
    PassThrough,
    /// Forward, then hold each response this long before sending it.
    Delay(Duration),
    /// Read each request, then close the connection without an answer.
    Drop,
    /// Answer `503 Slow Down` to the next N requests, then pass through.
    Fail503(u32),
    /// Forward without the `If-None-Match` request header.
    IgnoreIfNoneMatch,
}

struct Shared {
    mode: Mutex<Mode>,
    stopped: AtomicBool,
    requests: AtomicU64,
    upstream: u16,
}

/// A running proxy; stopped on drop.
pub struct FaultProxy {
    shared: Arc<Shared>,
    port: u16,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::PassThrough`] in front of
    /// `127.0.0.1:upstream`.
    ///
    /// # Panics
    /// When it cannot listen.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listen");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::PassThrough),
            stopped: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            upstream,
        });
        let mut p = FaultProxy { shared, port, acceptor: None };
        p.acceptor = Some(spawn_acceptor(listener, Arc::clone(&p.shared)));
        p
    }

    /// The endpoint URL to give walvault, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Switches the mode; requests already being handled finish in the old
    /// one.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// The mode now (a `Fail503` counts down as it answers).
    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many requests the proxy has received.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Closes the port, as a server that went away: new connections are
    /// refused and open ones are closed after their current request.
    pub fn stop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }

    /// Listens on the same port again after [`FaultProxy::stop`].
    ///
    /// # Panics
    /// When the port cannot be had again within 10 s.
    pub fn resume(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "proxy cannot listen on {} again: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        self.shared.stopped.store(false, Ordering::SeqCst);
        self.acceptor = Some(spawn_acceptor(listener, Arc::clone(&self.shared)));
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        // Non-blocking accept, so that stop() is noticed within 20 ms.
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        while !shared.stopped.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((client, _)) => {
                    let shared = Arc::clone(&shared);
                    std::thread::spawn(move || {
                        let _ = client.set_nonblocking(false);
                        serve(client, &shared);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
}

/// One HTTP message's head (start line and headers) and body.
struct Message {
    head: Vec<String>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head.join("\r\n").into_bytes();
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// Reads one request: its head, and a body of `Content-Length` bytes
/// (object_store always sends one). `None` at the end of the connection.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Message> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if head.is_empty() {
                continue;
            }
            break;
        }
        head.push(line);
    }
    let mut m = Message { head, body: Vec::new() };
    let len: usize = m.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    m.body = vec![0; len];
    r.read_exact(&mut m.body).ok()?;
    Some(m)
}

/// Handles one client connection, request by request (clients keep
/// connections alive).
fn serve(client: TcpStream, shared: &Shared) {
    let Ok(writer) = client.try_clone() else { return };
    let mut writer = writer;
    let mut reader = BufReader::new(client);
    while let Some(mut req) = read_request(&mut reader) {
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let client_closes = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mode = {
            let mut m = shared.mode.lock().unwrap_or_else(|e| e.into_inner());
            let now = *m;
            if let Mode::Fail503(n) = now {
                *m = if n <= 1 { Mode::PassThrough } else { Mode::Fail503(n - 1) };
            }
            now
        };
        if shared.stopped.load(Ordering::SeqCst) {
            break;
        }
        match mode {
            Mode::Drop => break,
            Mode::Fail503(_) => {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                            <Message>Please reduce your request rate.</Message></Error>";
                let resp = format!(
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if writer.write_all(resp.as_bytes()).is_err() {
                    break;
                }
                continue;
            }
            Mode::IgnoreIfNoneMatch => {
                req.head.retain(|l| !l.to_ascii_lowercase().starts_with("if-none-match:"));
            }
            Mode::PassThrough | Mode::Delay(_) => {}
        }
        // One upstream connection per request, closed by the server after
        // its answer: the whole response is what it sent until then.
        req.head.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
        req.head.push("Connection: close".into());
        let Ok(response) = forward(shared.upstream, &req) else { break };
        if let Mode::Delay(d) = mode {
            std::thread::sleep(d);
        }
        if shared.stopped.load(Ordering::SeqCst) || writer.write_all(&response).is_err() {
            break;
        }
        // A response without a length is delimited by the end of the
        // connection.
        let framed = {
            let text = String::from_utf8_lossy(&response[..response.len().min(4096)]).to_ascii_lowercase();
            text.contains("\r\ncontent-length:") || text.contains("\r\ntransfer-encoding: chunked")
        };
        if !framed || client_closes {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

fn forward(upstream: u16, req: &Message) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", upstream))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(&req.to_bytes())?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    if response.is_empty() {
        return Err(std::io::Error::other("upstream closed without an answer"));
    }
    Ok(response)
}
