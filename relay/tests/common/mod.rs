//! Harness for the end-to-end tests: runs the real `postern` binary with a
//! generated config in a temp data dir on free loopback ports, and the real
//! peers it is tested against (moto's S3 server, Postfix, Exim, swaks, Python).
//!
//! A peer that is not installed makes the test fail with a message naming
//! `e2e/install-deps`; nothing is skipped silently.
//!
//! `POSTERN_E2E_BIN` runs the tests against another build of the binary
//! (for example a release build) instead of the one cargo built for them.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod cluster;
pub mod dns;
pub mod mail;
pub mod pki;
pub mod rspamd;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postern::spool::message_file;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The hint every missing-tool failure carries.
pub const INSTALL_HINT: &str =
    "run `bash e2e/install-deps` (as root) to install the e2e test tools";

/// The repository root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Finds an executable on PATH or in the sbin directories; fails the test with
/// the install hint when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("`{name}` is not installed: {INSTALL_HINT}"))
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Fails the test unless `python3` can import `module`.
pub fn require_python_module(module: &str) {
    let python = require_tool("python3");
    let ok = Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "python3 cannot import `{module}`: {INSTALL_HINT}");
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Text with `\n` line ends turned into wire-format CRLF.
pub fn crlf(text: &str) -> Vec<u8> {
    text.replace('\n', "\r\n").into_bytes()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The data and the envelope of the sealed message file at `path` (the
/// spool's or a replica's); panics when it is not sealed.
pub fn sealed_message(path: &Path) -> (Vec<u8>, serde_json::Value) {
    let (data, envelope_json) = message_file::read_sealed(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let envelope = serde_json::from_slice(&envelope_json)
        .unwrap_or_else(|e| panic!("{}'s envelope is not JSON: {e}", path.display()));
    (data, envelope)
}

/// The message after our `Received:` trace header: strips the first header
/// field (with its folded continuation lines) and checks it is `Received:`.
pub fn strip_received(eml: &[u8]) -> &[u8] {
    assert!(
        eml.starts_with(b"Received:"),
        "spooled message does not start with our Received: header: {:?}",
        String::from_utf8_lossy(&eml[..eml.len().min(200)])
    );
    let mut pos = 0;
    loop {
        let end = find(&eml[pos..], b"\r\n")
            .map(|i| pos + i + 2)
            .expect("unterminated Received: header");
        match eml.get(end) {
            Some(b' ' | b'\t') => pos = end,
            _ => return &eml[end..],
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Every regular file under `dir`, as paths relative to it, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------- the relay

/// The object-store backend in the generated config.
#[derive(Clone, Debug)]
pub enum ObjectStore {
    /// A directory under the data dir (the single-machine default).
    Local,
    /// An S3 server (moto) at `endpoint`.
    S3 { endpoint: String, bucket: String },
}

/// What the generated config says.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Values of `spool.copies`: "local", "object_store".
    pub copies: Vec<&'static str>,
    pub required: usize,
    /// `spool.deadline` as a humantime string.
    pub deadline: &'static str,
    pub reserve_bytes: Option<u64>,
    pub max_message_size: Option<u64>,
    pub object_store: ObjectStore,
    /// Use this directory as the data dir instead of a fresh temp dir.
    pub data_dir: Option<PathBuf>,
    /// TOML appended to the config: delivery, routes, DNS. The default pauses
    /// delivery so what was accepted stays in the spool for inspection (and
    /// no MX lookup ever leaves the machine).
    pub extra_toml: String,
    /// TOML inside the `[[listener]]` table (e.g. `scanners = [...]`).
    pub listener_toml: String,
    /// TOML inside the `[spool]` table (e.g. `segment_forward_after = "2s"`).
    pub spool_toml: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            copies: vec!["local", "object_store"],
            required: 2,
            deadline: "10s",
            reserve_bytes: None,
            max_message_size: None,
            object_store: ObjectStore::Local,
            data_dir: None,
            extra_toml: "[delivery]\npaused = true\n".into(),
            listener_toml: String::new(),
            spool_toml: String::new(),
        }
    }
}

/// A running `postern serve`; killed when dropped. When the test is failing,
/// the tail of its log is printed.
pub struct Relay {
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    work: TempDir,
}

pub fn postern_bin() -> PathBuf {
    std::env::var_os("POSTERN_E2E_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_postern")))
}

impl Relay {
    /// Starts a relay with the default test config (local spool + local object store).
    pub fn start_default() -> Relay {
        Relay::start(RelayConfig::default())
    }

    /// Writes the config, starts the binary and waits until `/readyz` says 200.
    pub fn start(config: RelayConfig) -> Relay {
        let work = tempfile::Builder::new()
            .prefix("postern-e2e-")
            .tempdir()
            .unwrap();
        let data_dir = config
            .data_dir
            .clone()
            .unwrap_or_else(|| work.path().join("data"));
        let config_path = work.path().join("postern.toml");
        let mut relay = Relay {
            smtp: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            config_path,
            log_path: work.path().join("postern.log"),
            child: None,
            work,
        };
        // A free port may be taken by a parallel test between our probe and
        // the relay's bind: then try again on new ones.
        for attempt in 1.. {
            relay.smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
            relay.http = SocketAddr::from(([127, 0, 0, 1], free_port()));
            fs::write(
                &relay.config_path,
                render_config(&config, &relay.data_dir, relay.smtp, relay.http),
            )
            .unwrap();
            match relay.try_spawn() {
                Ok(()) => break,
                Err(exited) if attempt < 5 && exited.contains("Address already in use") => {}
                Err(exited) => panic!("{exited}"),
            }
        }
        relay
    }

    /// Starts the binary again on the same config, data dir and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() while the relay is running");
        self.spawn();
    }

    fn spawn(&mut self) {
        if let Err(exited) = self.try_spawn() {
            panic!("{exited}");
        }
    }

    /// Starts the binary and waits until it is ready; `Err` with its log
    /// when it exited first.
    fn try_spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        writeln!(
            &log,
            "==== postern serve --config {}",
            self.config_path.display()
        )
        .unwrap();
        let child = Command::new(postern_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", postern_bin().display()));
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "postern exited with {status} before it was ready; log:\n{}",
                    self.log()
                ));
            }
            if matches!(
                http_request(self.http, "GET", "/readyz", &[], b""),
                Ok((200, _))
            ) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "postern not ready on http://{}/readyz after 30 s; log:\n{}",
                    self.http,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay not running").id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the exit (killed after 20 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on a child we own and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    child.kill().unwrap();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            child.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    /// The local object-store directory (`object_store.kind = "local"`).
    pub fn objects_dir(&self) -> PathBuf {
        self.data_dir.join("objects")
    }

    /// Ids of committed messages: those whose file in the local spool is sealed.
    pub fn committed(&self) -> BTreeSet<String> {
        let dir = self.spool_dir();
        files_under(&dir)
            .iter()
            .filter_map(|file| {
                let name = Path::new(file).file_name()?.to_str()?;
                let id = name.strip_suffix(".msg")?;
                matches!(
                    message_file::read_seal_at(&dir.join(file)),
                    Ok(message_file::Seal::Sealed { .. })
                )
                .then(|| id.to_owned())
            })
            .collect()
    }

    /// The local spool's file of message `id`.
    pub fn spool_file(&self, id: &str) -> PathBuf {
        message_file::path(&postern::spool::local::shard_dir(&self.spool_dir(), id), id)
    }

    /// The data of committed message `id`, as the local spool holds it.
    pub fn eml(&self, id: &str) -> Vec<u8> {
        sealed_message(&self.spool_file(id)).0
    }

    /// The envelope of committed message `id`, as the local spool holds it.
    pub fn env(&self, id: &str) -> serde_json::Value {
        sealed_message(&self.spool_file(id)).1
    }

    /// Checks that message `id` is committed, its envelope matches its data,
    /// and the data is our `Received:` header followed by exactly `sent`.
    pub fn assert_spooled(&self, id: &str, sent: &[u8]) {
        let eml = self.eml(id);
        let body = strip_received(&eml);
        if body != sent {
            panic!(
                "{id}'s data differs from the sent message after the Received: header\n--- sent ({} octets)\n{}\n--- spooled ({} octets)\n{}",
                sent.len(),
                String::from_utf8_lossy(sent).escape_debug(),
                body.len(),
                String::from_utf8_lossy(body).escape_debug()
            );
        }
        let env = self.env(id);
        assert_eq!(env["id"], id, "{id}'s envelope names another id: {env}");
        assert_eq!(
            env["data_len"],
            eml.len() as u64,
            "{id}'s envelope data_len: {env}"
        );
        assert_eq!(
            env["data_sha256"],
            sha256_hex(&eml),
            "{id}'s envelope data_sha256: {env}"
        );
    }

    /// Waits until at least `n` messages are committed; returns them.
    pub fn wait_committed(&self, n: usize, timeout: Duration) -> BTreeSet<String> {
        wait_for(timeout, || Some(self.committed()).filter(|c| c.len() >= n)).unwrap_or_else(|| {
            panic!(
                "expected {n} committed messages within {timeout:?}, have {:?}; log:\n{}",
                self.committed(),
                self.log()
            )
        })
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        scrape_metrics(self.http)
    }

    /// The value of counter `name` in `/metrics`.
    pub fn counter(&self, name: &str) -> u64 {
        counter_of(self.http, name)
    }

    pub fn connect(&self) -> Smtp {
        Smtp::connect(self.smtp)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- postern log ({}), last {} lines:",
                self.log_path.display(),
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

fn render_config(
    config: &RelayConfig,
    data_dir: &Path,
    smtp: SocketAddr,
    http: SocketAddr,
) -> String {
    let mut out = format!(
        "hostname = \"postern.test\"\ndata_dir = {data_dir:?}\n\n[[listener]]\nname = \"smtp\"\naddress = \"{smtp}\"\n{}\n[http]\nlisten = \"{http}\"\n\n",
        config.listener_toml
    );
    if let Some(size) = config.max_message_size {
        out += &format!("[limits]\nmax_message_size = {size}\n\n");
    }
    let copies: Vec<String> = config.copies.iter().map(|c| format!("\"{c}\"")).collect();
    out += &format!(
        "[spool]\ncopies = [{}]\nrequired = {}\ndeadline = \"{}\"\n",
        copies.join(", "),
        config.required,
        config.deadline
    );
    if let Some(reserve) = config.reserve_bytes {
        out += &format!("reserve_bytes = {reserve}\n");
    }
    out += &config.spool_toml;
    out += "\n[object_store]\n";
    match &config.object_store {
        ObjectStore::Local => out += "kind = \"local\"\n",
        ObjectStore::S3 { endpoint, bucket } => {
            out += &format!(
            "kind = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\nallow_http = true\n\
                 access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n"
        )
        }
    }
    out += "\n";
    out += &config.extra_toml;
    out
}

// ---------------------------------------------------------------- SMTP client

/// One SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The spool id from `250 2.0.0 Ok: queued as <id>`.
    pub fn queued_id(&self) -> String {
        queued_id(&self.text()).unwrap_or_else(|| panic!("not a `queued as` reply: {self}"))
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// The id after the last `queued as ` in `text`.
pub fn queued_id(text: &str) -> Option<String> {
    let (_, rest) = text.rsplit_once("queued as ")?;
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect();
    (!id.is_empty()).then_some(id)
}

/// A plain SMTP client over TCP with no cleverness: it sends what it is told,
/// so raw-protocol tests can send what no library would.
pub struct Smtp {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Smtp {
    /// Connects and reads the greeting, which must be 220.
    pub fn connect(addr: SocketAddr) -> Smtp {
        let mut smtp = Smtp::connect_raw(addr);
        let greeting = smtp.reply();
        assert_eq!(greeting.code, 220, "greeting: {greeting}");
        smtp
    }

    /// Connects without reading the greeting.
    pub fn connect_raw(addr: SocketAddr) -> Smtp {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Smtp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
        }
    }

    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends, reporting a connection the peer already closed instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one (possibly multi-line) reply; panics on EOF or timeout.
    pub fn reply(&mut self) -> Reply {
        match self.try_reply() {
            Ok(Some(reply)) => reply,
            Ok(None) => panic!("connection closed while waiting for a reply"),
            Err(e) => panic!("no reply: {e}"),
        }
    }

    /// Reads one reply; `Ok(None)` on a clean EOF.
    pub fn try_reply(&mut self) -> std::io::Result<Option<Reply>> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                return if lines.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "EOF inside a reply",
                    ))
                };
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if line.len() < 3 || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad reply line {line:?}"),
                ));
            }
            let code: u16 = line[..3].parse().unwrap();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return Ok(Some(Reply { code, lines }));
            }
        }
    }

    /// Reads replies until EOF or until none arrives for `quiet`.
    pub fn drain_replies(&mut self, quiet: Duration) -> Vec<Reply> {
        self.set_read_timeout(quiet);
        let mut out = Vec::new();
        while let Ok(Some(reply)) = self.try_reply() {
            out.push(reply);
        }
        out
    }

    /// Sends `line` + CRLF and reads the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Like `cmd`, but the reply must have `code`.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.cmd(line);
        assert_eq!(reply.code, code, "{line:?} got {reply}");
        reply
    }

    pub fn ehlo(&mut self) -> Reply {
        self.expect("EHLO client.test", 250)
    }

    pub fn half_close(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// MAIL, RCPT..., DATA, the dot-stuffed `data` and the final dot. Returns
    /// the first reply that is not positive, or the end-of-data reply.
    pub fn send_mail(&mut self, mail_from: &str, rcpts: &[&str], data: &[u8]) -> Reply {
        let reply = self.cmd(&format!("MAIL FROM:{mail_from}"));
        if !reply.is_positive() {
            return reply;
        }
        for rcpt in rcpts {
            let reply = self.cmd(&format!("RCPT TO:{rcpt}"));
            if !reply.is_positive() {
                return reply;
            }
        }
        let reply = self.cmd("DATA");
        if reply.code != 354 {
            return reply;
        }
        self.send(&dot_stuff(data));
        self.send(b".\r\n");
        self.reply()
    }
}

/// Dot-stuffs wire-format data that ends with CRLF.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    assert!(data.ends_with(b"\r\n"), "message data must end with CRLF");
    let mut out = Vec::with_capacity(data.len() + 16);
    let mut line_start = true;
    for &byte in data {
        if line_start && byte == b'.' {
            out.push(b'.');
        }
        out.push(byte);
        line_start = byte == b'\n';
    }
    out
}

// ---------------------------------------------------------------- HTTP

/// The `/metrics` text of the relay whose HTTP endpoint is `http`.
pub fn scrape_metrics(http: SocketAddr) -> String {
    let (status, body) = http_request(http, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// The value of the unlabelled series `name` on `http`'s `/metrics`.
pub fn counter_of(http: SocketAddr, name: &str) -> u64 {
    let metrics = scrape_metrics(http);
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in:\n{metrics}"))
}

/// A tiny HTTP/1.1 client (one request per connection); returns status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let head_end = find(&response, b"\r\n\r\n").ok_or_else(|| invalid("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut body = response[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| invalid("bad chunked body"))?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------- moto (S3)

/// A moto S3 server on a free loopback port; killed when dropped.
pub struct Moto {
    pub addr: SocketAddr,
    child: Option<Child>,
    log_path: PathBuf,
    _work: TempDir,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = require_tool("moto_server");
        require_python_module("moto.server");
        let work = tempfile::Builder::new()
            .prefix("moto-e2e-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let log_path = work.path().join("moto.log");
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut moto = Moto {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            log_path,
            _work: work,
        };
        let ready = wait_for(Duration::from_secs(60), || {
            if let Some(status) = moto.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited with {status}:\n{}", moto.log());
            }
            http_request(moto.addr, "GET", "/", &[], b"").ok()
        });
        assert!(
            ready.is_some(),
            "moto_server not answering on {}:\n{}",
            moto.addr,
            moto.log()
        );
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) =
            http_request(self.addr, "PUT", &format!("/{bucket}"), &[], b"").unwrap();
        assert_eq!(
            status,
            200,
            "create bucket: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Object keys in `bucket` (ListObjectsV2 over plain HTTP).
    pub fn list(&self, bucket: &str) -> Vec<String> {
        let (status, body) = http_request(
            self.addr,
            "GET",
            &format!("/{bucket}?list-type=2"),
            &[],
            b"",
        )
        .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "list bucket: {body}");
        body.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_owned()))
            .collect()
    }

    /// An object's bytes.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        s3_get(self.addr, bucket, key)
            .unwrap_or_else(|| panic!("GET {bucket}/{key}: no such object"))
    }

    /// Kills the server (the S3 endpoint then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- Postfix

/// A private Postfix instance (e2e/postfix-instance): own config, queue and
/// data directories in a temp dir, SMTP on a free loopback port. Stopped on drop.
pub struct Postfix {
    pub port: u16,
    pub dir: TempDir,
}

impl Postfix {
    /// Starts Postfix with extra `main.cf` lines (e.g. a relayhost).
    pub fn start(main_cf: &[String]) -> Postfix {
        require_tool("postfix");
        let dir = tempfile::Builder::new()
            .prefix("postfix-e2e-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let script = repo_root().join("e2e/postfix-instance");
        let output = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir.path())
            .arg(port.to_string())
            .args(main_cf)
            .output()
            .unwrap();
        let postfix = Postfix { port, dir };
        assert!(
            output.status.success(),
            "postfix-instance start failed: {}{}\nmaillog:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            postfix.maillog()
        );
        postfix
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("e2e/postfix-instance"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
        if std::thread::panicking() {
            eprintln!("---- postfix maillog:\n{}", self.maillog());
        }
    }
}

// ---------------------------------------------------------------- other clients

/// Runs a command to completion; returns (success, stdout + stderr).
pub fn run(command: &mut Command) -> (bool, String) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", command.get_program()));
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text += &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Writes `data` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: impl AsRef<OsStr>, data: &[u8]) -> PathBuf {
    let path = dir.join(name.as_ref());
    fs::write(&path, data).unwrap();
    path
}

/// Lets `nobody` reach `dir` (and the socket in it): search permission on
/// every directory above it.
pub fn traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors() {
        if ancestor == Path::new("/") {
            break;
        }
        let mode = fs::metadata(ancestor).unwrap().permissions().mode();
        if mode & 0o001 == 0 {
            fs::set_permissions(ancestor, fs::Permissions::from_mode(mode | 0o011)).unwrap();
        }
    }
}

/// An object's bytes from the S3 server at `addr`, `None` when it is absent.
/// moto answers anonymous GETs with 403 but checks no signatures, so any
/// SigV4-shaped Authorization header will do.
pub fn s3_get(addr: SocketAddr, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, \
                SignedHeaders=host, Signature=00";
    let (status, body) = http_request(
        addr,
        "GET",
        &format!("/{bucket}/{key}"),
        &[("Authorization", auth)],
        b"",
    )
    .unwrap();
    if status == 404 {
        return None;
    }
    assert_eq!(
        status,
        200,
        "GET {bucket}/{key}: {}",
        String::from_utf8_lossy(&body)
    );
    Some(body)
}

/// One message of a segment object: id, envelope JSON, data.
pub type SegmentMessage = (String, Vec<u8>, Vec<u8>);

/// The messages a whole segment object holds, read through its index.
pub fn segment_messages(object: &[u8]) -> Vec<SegmentMessage> {
    let slots = postern::spool::segment::parse_tail(object, object.len() as u64)
        .unwrap_or_else(|err| panic!("not a segment object: {err}"));
    let part =
        |range: std::ops::Range<u64>| object[range.start as usize..range.end as usize].to_vec();
    slots
        .into_iter()
        .map(|slot| {
            let (envelope, data) = (part(slot.envelope_range()), part(slot.data_range()));
            (slot.id, envelope, data)
        })
        .collect()
}
