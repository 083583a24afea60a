//! Mail peers shared by the end-to-end tests: the scriptable aiosmtpd sink
//! (e2e/sink.py), a private Dovecot LMTP server, and DSN parsing with
//! Python's email package.

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// The `.eml` names e2e/sink.py has written to `dir`, in arrival order.
pub fn sink_messages(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".eml"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The scriptable aiosmtpd sink; killed on drop.
pub struct Sink {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    child: Child,
    _work: TempDir,
}

impl Sink {
    pub fn start(addr: SocketAddr, args: &[&str]) -> Sink {
        Sink::try_start(addr, args).unwrap_or_else(|| panic!("sink did not start on {addr}"))
    }

    /// The sink on `addr`, or `None` when it did not start (the port was
    /// taken meanwhile, say).
    fn try_start(addr: SocketAddr, args: &[&str]) -> Option<Sink> {
        require_python_module("aiosmtpd");
        let work = tempfile::Builder::new()
            .prefix("sink-e2e-")
            .tempdir()
            .unwrap();
        let dir = work.path().join("mail");
        let mut child = Command::new(require_tool("python3"))
            .arg(repo_root().join("e2e/sink.py"))
            .args([
                "--listen",
                &addr.to_string(),
                "--dir",
                dir.to_str().unwrap(),
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        Some(Sink {
            addr,
            dir,
            child,
            _work: work,
        })
    }

    /// A sink on a free loopback port. A port found free can be taken by
    /// another test before the sink binds it: then another one is tried.
    pub fn loopback(args: &[&str]) -> Sink {
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if let Some(sink) = Sink::try_start(addr, args) {
                return sink;
            }
        }
        panic!("no sink started on five free ports");
    }

    /// Messages received so far: (bytes, envelope JSON), in arrival order.
    pub fn messages(&self) -> Vec<(Vec<u8>, serde_json::Value)> {
        sink_messages(&self.dir)
            .iter()
            .map(|name| {
                let eml = fs::read(self.dir.join(name)).unwrap();
                let json = fs::read(self.dir.join(name.replace(".eml", ".json"))).unwrap();
                (eml, serde_json::from_slice(&json).unwrap())
            })
            .collect()
    }

    /// Messages whose envelope recipients include `rcpt`.
    pub fn messages_for(&self, rcpt: &str) -> Vec<Vec<u8>> {
        self.messages()
            .into_iter()
            .filter(|(_, env)| {
                env["rcpt_tos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == rcpt)
            })
            .map(|(eml, _)| eml)
            .collect()
    }

    pub fn wait_for_rcpt(&self, rcpt: &str, timeout: Duration) -> Vec<u8> {
        wait_for(timeout, || self.messages_for(rcpt).into_iter().next()).unwrap_or_else(|| {
            panic!(
                "nothing for {rcpt} reached the sink at {} in {timeout:?}",
                self.addr
            )
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// No message in the spool and no delivery state in the journal (the
/// running relay's `/stats`).
pub fn queue_is_empty(relay: &Relay) -> bool {
    let Ok((200, body)) = http_request(relay.http, "GET", "/stats", &[], b"") else {
        return false;
    };
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    relay.committed().is_empty() && stats["state_records"] == 0 && stats["queue_depth"] == 0
}

/// `postern queue show ID --json` on a running relay: the message as the
/// queue holds it (attempts, each recipient's status and last reply).
pub fn queue_show(relay: &Relay, id: &str) -> Option<serde_json::Value> {
    let shown = Command::new(postern_bin())
        .args(["queue", "show", id, "--json", "--data-dir"])
        .arg(&relay.data_dir)
        .output()
        .unwrap();
    serde_json::from_slice(&shown.stdout).ok()
}

/// The `Final-Recipient` of each recipient a parsed DSN reports.
pub fn reported_recipients(report: &serde_json::Value) -> Vec<String> {
    report["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Final-Recipient"].as_str().unwrap().to_owned())
        .collect()
}

/// Parses a DSN with Python's email package and returns its report fields.
pub fn parse_dsn(bytes: &[u8]) -> serde_json::Value {
    let script = r#"
import email, email.parser, json, sys
from email import policy
raw = sys.stdin.buffer.read()
msg = email.message_from_bytes(raw, policy=policy.compat32)
assert msg.get_content_type() == "multipart/report", msg.get_content_type()
assert msg.get_param("report-type") == "delivery-status"
parts = msg.get_payload()
assert len(parts) == 3, len(parts)
assert parts[0].get_content_type() == "text/plain"
status = parts[1]
if status.get_content_type() == "message/delivery-status":
    blocks = [dict((k, str(v)) for k, v in b.items()) for b in status.get_payload()]
else:
    # RFC 6533 message/global-delivery-status: UTF-8 header blocks.
    assert status.get_content_type() == "message/global-delivery-status", status.get_content_type()
    sections = raw.decode("utf-8").replace("\r\n", "\n").split("--" + msg.get_param("boundary"))
    text = sections[2].split("\n\n", 1)[1]
    parser = email.parser.HeaderParser()
    blocks = [dict(parser.parsestr(b.strip() + "\n").items()) for b in text.replace("\r\n", "\n").split("\n\n") if b.strip()]
returned = parts[2].get_content_type()
print(json.dumps({"to": str(msg["To"]), "from": str(msg["From"]), "subject": str(msg["Subject"]),
                  "status_type": status.get_content_type(),
                  "message": blocks[0], "recipients": blocks[1:], "returned": returned,
                  "auto_submitted": str(msg["Auto-Submitted"])}))
"#;
    let mut child = Command::new(require_tool("python3"))
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), bytes).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "not a well-formed DSN: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(bytes)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A private Dovecot with an LMTP listener and three users: alice, bob, and
/// carol whose 1-byte quota makes her refuse after the data.
pub struct Dovecot {
    pub port: u16,
    config: PathBuf,
    mail: PathBuf,
    _work: TempDir,
}

impl Dovecot {
    pub fn start() -> Dovecot {
        let bin = require_tool("dovecot");
        let work = tempfile::Builder::new()
            .prefix("dovecot-e2e-")
            .tempdir()
            .unwrap();
        let root = work.path();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let mail = root.join("mail");
        fs::create_dir(&mail).unwrap();
        let _ = Command::new("chown")
            .arg("dovecot:dovecot")
            .arg(&mail)
            .status();
        let port = free_port();
        fs::write(
            root.join("users"),
            "alice:{PLAIN}x::::::\nbob:{PLAIN}x::::::\ncarol:{PLAIN}x::::::userdb_quota_rule=*:storage=1B\n",
        )
        .unwrap();
        let config = root.join("dovecot.conf");
        let r = root.display();
        fs::write(
            &config,
            format!(
                "base_dir = {r}/run\nstate_dir = {r}/state\nlog_path = {r}/dovecot.log\n\
                 protocols = lmtp\nlisten = 127.0.0.1\nssl = no\nfirst_valid_uid = 1\nfirst_valid_gid = 1\n\
                 mail_location = maildir:{r}/mail/%n\nauth_username_format = %n\n\
                 mail_plugins = quota\nplugin {{\n  quota = maildir:User quota\n}}\n\
                 passdb {{\n  driver = passwd-file\n  args = {r}/users\n}}\n\
                 userdb {{\n  driver = passwd-file\n  args = {r}/users\n  default_fields = uid=dovecot gid=dovecot home={r}/mail/%n\n}}\n\
                 service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n}}\n"
            ),
        )
        .unwrap();
        let status = Command::new(&bin).arg("-c").arg(&config).status().unwrap();
        assert!(status.success(), "dovecot did not start");
        let dovecot = Dovecot {
            port,
            config,
            mail,
            _work: work,
        };
        assert!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .ok())
            .is_some(),
            "dovecot's LMTP listener did not come up"
        );
        dovecot
    }

    pub fn inbox(&self, user: &str) -> Vec<Vec<u8>> {
        let dir = self.mail.join(user).join("new");
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| fs::read(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        stop_dovecot(&self.config);
    }
}

/// Stops the private Dovecot started with `config`.
pub fn stop_dovecot(config: &std::path::Path) {
    let _ = Command::new("dovecot")
        .arg("-c")
        .arg(config)
        .arg("stop")
        .status();
}
