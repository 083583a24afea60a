//! `smtp-loadgen`: sends messages over concurrent SMTP sessions and reports
//! throughput and the time from the end of the data (the message and its
//! final `.` line, sent in one write) to the server's reply — what
//! `smtp-source` does not measure.
//!
//! ```text
//! smtp-loadgen --addr 127.0.0.1:2525 --sessions 50 --messages 20000 --size 10240
//! ```
//!
//! Each session connects once, says EHLO, then sends MAIL, RCPT, DATA and the
//! message one command at a time (no pipelining), like `smtp-source -d`.
//! Output is one `key=value` line for the benchmark script to parse.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
struct Options {
    addr: SocketAddr,
    sessions: usize,
    messages: usize,
    size: usize,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        addr: "127.0.0.1:2525".parse()?,
        sessions: 50,
        messages: 1000,
        size: 10 * 1024,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => options.addr = value.parse()?,
            "--sessions" => options.sessions = value.parse()?,
            "--messages" => options.messages = value.parse()?,
            "--size" => options.size = value.parse()?,
            _ => bail!("unknown flag {flag}; flags: --addr --sessions --messages --size"),
        }
    }
    if options.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    Ok(options)
}

/// A message of about `size` octets (a few headers and 78-octet lines), with
/// the `.` line that ends DATA; no line starts with a dot.
fn message(size: usize) -> Vec<u8> {
    let mut data =
        b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\nSubject: postern bench\r\n\r\n"
            .to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n";
    while data.len() + line.len() <= size {
        data.extend_from_slice(line);
    }
    data.extend_from_slice(b"end\r\n.\r\n");
    data
}

struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let mut conn = Conn {
            reader: BufReader::new(read),
            writer,
            line: String::new(),
        };
        conn.expect(220).await?;
        conn.command(b"EHLO loadgen.bench\r\n", 250).await?;
        Ok(conn)
    }

    /// Reads one reply; returns its code.
    async fn reply(&mut self) -> Result<u16> {
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line).await? == 0 {
                bail!("connection closed");
            }
            let code: u16 = self
                .line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .context("bad reply")?;
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(code);
            }
        }
    }

    async fn expect(&mut self, code: u16) -> Result<()> {
        let got = self.reply().await?;
        if got != code {
            bail!("expected {code}, got {}", self.line.trim_end());
        }
        Ok(())
    }

    async fn command(&mut self, line: &[u8], code: u16) -> Result<()> {
        self.writer.write_all(line).await?;
        self.expect(code).await
    }

    /// One transaction; returns the end-of-data-to-reply time.
    async fn send(&mut self, data: &[u8]) -> Result<Duration> {
        self.command(b"MAIL FROM:<bench@example.org>\r\n", 250)
            .await?;
        self.command(b"RCPT TO:<sink@example.net>\r\n", 250).await?;
        self.command(b"DATA\r\n", 354).await?;
        // `data` ends with the `.` line: one write, as real clients send a
        // small message, so the reply is timed from the end of the data.
        let start = Instant::now();
        self.writer.write_all(data).await?;
        self.expect(250).await?;
        Ok(start.elapsed())
    }
}

async fn session(
    addr: SocketAddr,
    data: Arc<Vec<u8>>,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Result<Vec<Duration>> {
    let mut conn = Conn::connect(addr).await?;
    let mut latencies = Vec::new();
    while next.fetch_add(1, Ordering::Relaxed) < total {
        latencies.push(conn.send(&data).await?);
    }
    conn.command(b"QUIT\r\n", 221).await.ok();
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse_args()?;
    let data = Arc::new(message(options.size));
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..options.sessions)
        .map(|_| {
            tokio::spawn(session(
                options.addr,
                data.clone(),
                next.clone(),
                options.messages,
            ))
        })
        .collect();
    let mut latencies = Vec::with_capacity(options.messages);
    let mut errors = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(mut l) => latencies.append(&mut l),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    println!(
        "messages={} errors={} seconds={:.3} msgs_per_sec={:.1} p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        latencies.len(),
        errors.len(),
        elapsed,
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 50.0),
        percentile(&latencies, 90.0),
        percentile(&latencies, 99.0),
        percentile(&latencies, 100.0),
    );
    if let Some(first) = errors.first() {
        eprintln!(
            "smtp-loadgen: {} sessions failed; first error: {first}",
            errors.len()
        );
        std::process::exit(1);
    }
    Ok(())
}
