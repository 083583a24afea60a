//! A running relay against people rather than crashes: Debian's
//! `testssl.sh` on the STARTTLS listener, the two submission listeners
//! (STARTTLS and implicit TLS) and a mutual-TLS port (the TCP admin
//! service, which runs the same code as the peer channel:
//! `peer::tls::MutualTls`); `nmap --script smtp-open-relay` on every SMTP
//! listener from a client the relay does not trust; and Python's smtplib
//! as clients over their `[rate_limits]` next to one that is not. Each
//! scanner's report is parsed and printed in short; the tests fail on a
//! HIGH or CRITICAL finding, or an open relay. The tools come from
//! `bash e2e/install-deps`; without them these tests fail naming the
//! install.

mod common;

use std::path::Path;
use std::process::Command;

use common::pki;
use common::*;

/// The relay under scan: STARTTLS with a certificate for `postern.test`,
/// the admin service on TCP with mutual TLS, trusting no client network.
struct Scanned {
    relay: Relay,
    admin: u16,
    /// A `submission` listener (STARTTLS, then AUTH).
    submission: std::net::SocketAddr,
    /// A `submissions` listener (implicit TLS, then AUTH).
    submissions: std::net::SocketAddr,
    /// The CA of every certificate here (testssl's `--add-ca`).
    ca_file: std::path::PathBuf,
    _pki: tempfile::TempDir,
}

fn scanned() -> Scanned {
    let pki_dir = tempfile::tempdir().unwrap();
    let ca = pki::ca("scan CA");
    let listener = pki::member_files(pki_dir.path(), &ca, "listener");
    let admin_tls = pki::member_files(pki_dir.path(), &ca, "admin");
    let admin = free_port();
    let submission = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let submissions = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    // One user with a bcrypt hash; the scanners never log in.
    let passwd = pki::write(
        pki_dir.path(),
        "passwd",
        "alice:$2y$05$VFGFUgLucYiovSaQUwx1Lep100QOEK6zmfgM.p9/QEJRT77f/3/Be\n",
    );
    let (cert, key) = (
        listener.cert_file.display().to_string(),
        listener.key_file.display().to_string(),
    );
    let relay = Relay::start(RelayConfig {
        listener_toml: format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            listener.cert_file.display(),
            listener.key_file.display()
        ),
        extra_toml: format!(
            "[delivery]\npaused = true\n\n\
             [policy]\nrelay_domains = [\"example.test\"]\ntrusted_networks = []\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[admin.tls]\ncert_file = \"{}\"\n\
             key_file = \"{}\"\nca_file = \"{}\"\n\n\
             [[listener]]\nname = \"submission\"\naddress = \"{submission}\"\nmode = \"submission\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [[listener]]\nname = \"submissions\"\naddress = \"{submissions}\"\nmode = \"submissions\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [auth]\npassword_file = \"{}\"\n",
            admin_tls.cert_file.display(),
            admin_tls.key_file.display(),
            admin_tls.ca_file.display(),
            passwd.display()
        ),
        ..RelayConfig::default()
    });
    Scanned {
        relay,
        admin,
        submission,
        submissions,
        ca_file: listener.ca_file.clone(),
        _pki: pki_dir,
    }
}

/// testssl.sh's findings (its JSON report) for `target` with `args`.
fn testssl(target: &str, args: &[&str], report: &Path) -> Vec<serde_json::Value> {
    let output = Command::new(require_tool("testssl"))
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--ip",
            "one",
        ])
        .arg("--jsonfile")
        .arg(report)
        .args(args)
        .arg(target)
        .output()
        .expect("run testssl");
    let text = std::fs::read_to_string(report).unwrap_or_else(|err| {
        panic!(
            "testssl wrote no report ({err}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
}

/// Prints a short summary of `findings` and fails on HIGH or CRITICAL ones;
/// checks the scan saw TLS 1.3 offered and TLS 1.1 and older not.
fn judge(what: &str, findings: &[serde_json::Value]) {
    let finding = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .and_then(|f| f["finding"].as_str())
            .unwrap_or("(not reported)")
            .to_owned()
    };
    let mut by_severity = std::collections::BTreeMap::<String, usize>::new();
    for f in findings {
        *by_severity
            .entry(f["severity"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    eprintln!(
        "testssl {what}: {} findings by severity {by_severity:?}; TLS1.3 {:?}, TLS1.2 {:?}, TLS1.1 {:?}, SSLv3 {:?}",
        findings.len(),
        finding("TLS1_3"),
        finding("TLS1_2"),
        finding("TLS1_1"),
        finding("SSLv3")
    );
    // Revocation is the issuing CA's business: a private CA (cert-manager's
    // CA issuer, this test's) publishes neither CRL nor OCSP.
    for f in findings.iter().filter(|f| {
        matches!(
            f["severity"].as_str(),
            Some("LOW" | "MEDIUM" | "WARN" | "HIGH")
        )
    }) {
        eprintln!("  {} {}: {}", f["severity"], f["id"], f["finding"]);
    }
    let bad: Vec<&serde_json::Value> = findings
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL")))
        .filter(|f| f["id"] != "cert_revocation")
        .collect();
    assert!(bad.is_empty(), "{what}: {bad:#?}");
    assert!(
        finding("TLS1_3").starts_with("offered"),
        "{what}: TLS 1.3 {}",
        finding("TLS1_3")
    );
    for old in ["TLS1_1", "TLS1", "SSLv3", "SSLv2"] {
        assert!(
            finding(old).starts_with("not offered"),
            "{what}: {old} {}",
            finding(old)
        );
    }
}

#[test]
fn testssl_finds_nothing_high_or_critical_on_starttls_or_mutual_tls() {
    let scanned = scanned();
    let work = tempfile::tempdir().unwrap();
    let smtp = testssl(
        &scanned.relay.smtp.to_string(),
        &["--add-ca", scanned.ca_file.to_str().unwrap(), "-t", "smtp"],
        &work.path().join("smtp.json"),
    );
    judge("SMTP STARTTLS", &smtp);
    let mutual = testssl(
        &format!("127.0.0.1:{}", scanned.admin),
        &["--add-ca", scanned.ca_file.to_str().unwrap()],
        &work.path().join("mtls.json"),
    );
    judge("mutual TLS (admin = peer channel code)", &mutual);
}

#[test]
fn testssl_finds_nothing_high_or_critical_on_the_submission_ports() {
    let scanned = scanned();
    let work = tempfile::tempdir().unwrap();
    let starttls = testssl(
        &scanned.submission.to_string(),
        &["--add-ca", scanned.ca_file.to_str().unwrap(), "-t", "smtp"],
        &work.path().join("587.json"),
    );
    judge("submission (587-style, STARTTLS)", &starttls);
    let implicit = testssl(
        &scanned.submissions.to_string(),
        &["--add-ca", scanned.ca_file.to_str().unwrap()],
        &work.path().join("465.json"),
    );
    judge("submissions (465-style, implicit TLS)", &implicit);
}

#[test]
fn nmap_finds_no_open_relay_on_any_listener() {
    let scanned = scanned();
    for listener in [scanned.relay.smtp, scanned.submission, scanned.submissions] {
        nmap_open_relay(listener);
    }
}

/// nmap's smtp-open-relay script against `listener`, from a client the
/// relay does not trust and that does not log in.
fn nmap_open_relay(listener: std::net::SocketAddr) {
    let output = Command::new(require_tool("nmap"))
        .args([
            "-Pn",
            "-sT",
            "-sV",
            "-p",
            &listener.port().to_string(),
            "--script",
            "smtp-open-relay",
            "--script-args",
            "smtp-open-relay.domain=postern.test",
            &listener.ip().to_string(),
        ])
        .output()
        .expect("run nmap");
    let report = String::from_utf8_lossy(&output.stdout);
    eprintln!("nmap against {listener}: {report}");
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains("smtp-open-relay"),
        "the script ran: {report}"
    );
    // "doesn't seem to be an open relay, all tests failed" on the SMTP
    // listener; "isn't an open relay, authentication needed" on submission.
    assert!(
        report.contains("doesn't seem to be an open relay")
            || report.contains("isn't an open relay, authentication needed"),
        "{report}"
    );
    assert!(!report.contains("is an open relay"), "{report}");
}

/// Runs Python's smtplib from `source` against `smtp`: `sessions`
/// connections, each sending `messages` transactions of `recipients`
/// recipients; prints and returns every reply code in order (connection
/// refusals as the code of the greeting).
fn smtplib(
    smtp: std::net::SocketAddr,
    source: &str,
    sessions: usize,
    messages: usize,
    recipients: usize,
) -> (Vec<u16>, std::time::Duration) {
    const CLIENT: &str = r#"
import smtplib, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sessions, messages, recipients = map(int, sys.argv[4:7])
codes = []
for _ in range(sessions):
    try:
        s = smtplib.SMTP(host, port, source_address=(source, 0), timeout=10)
    except smtplib.SMTPConnectError as e:
        codes.append(e.smtp_code)
        continue
    s.ehlo("client.example")
    for m in range(messages):
        code, _ = s.mail("sender@example.org")
        codes.append(code)
        if code != 250:
            s.rset()
            continue
        ok = 0
        for r in range(recipients):
            code, _ = s.rcpt("rcpt%d@example.test" % r)
            codes.append(code)
            ok += code == 250
        if ok:
            code, _ = s.data(b"Subject: rate\r\n\r\nbody\r\n")
            codes.append(code)
        else:
            s.rset()
    s.quit()
print(" ".join(str(c) for c in codes))
"#;
    let started = std::time::Instant::now();
    let output = Command::new("python3")
        .args(["-c", CLIENT])
        .arg(smtp.ip().to_string())
        .arg(smtp.port().to_string())
        .arg(source)
        .args([sessions, messages, recipients].map(|n| n.to_string()))
        .output()
        .expect("python3");
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let codes: Vec<u16> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    (codes, took)
}

fn count(codes: &[u16], code: u16) -> usize {
    codes.iter().filter(|&&c| c == code).count()
}

/// `[rate_limits]` from untrusted clients: one over its message, recipient
/// and connection rates hears 450 4.7.1 and 421 4.7.0 while another
/// address, sending just as much at the same time, is served in full.
#[test]
fn a_client_over_its_rate_is_slowed_and_another_is_served_in_full() {
    let relay = Relay::start(RelayConfig {
        extra_toml: "[delivery]\npaused = true\n\n\
             [policy]\nrelay_domains = [\"example.test\"]\ntrusted_networks = []\n\n\
             [rate_limits]\nconnections = \"4/1h\"\nmessages = \"6/1h\"\nrecipients = \"30/1h\"\n"
            .into(),
        ..RelayConfig::default()
    });
    let smtp = relay.smtp;
    let (greedy, calm) = std::thread::scope(|scope| {
        let greedy = scope.spawn(|| smtplib(smtp, "127.0.0.2", 1, 10, 5));
        let calm = scope.spawn(|| smtplib(smtp, "127.0.0.3", 1, 6, 5));
        (greedy.join().unwrap(), calm.join().unwrap())
    });
    eprintln!(
        "over its rate (127.0.0.2): {} x 250 MAIL+RCPT+DATA replies, {} x 450 in {:?}",
        count(&greedy.0, 250),
        count(&greedy.0, 450),
        greedy.1
    );
    eprintln!(
        "within (127.0.0.3): {} x 250, {} x 450 in {:?}",
        count(&calm.0, 250),
        count(&calm.0, 450),
        calm.1
    );
    // Within: 6 transactions x (MAIL + 5 RCPT + DATA), every one 250.
    assert_eq!(count(&calm.0, 250), 6 * 7, "{:?}", calm.0);
    assert_eq!(count(&calm.0, 450), 0, "{:?}", calm.0);
    // Over: 6 transactions pass, 30 recipients between them; the other four
    // MAILs hear 450.
    assert_eq!(count(&greedy.0, 450), 4, "{:?}", greedy.0);
    assert_eq!(count(&greedy.0, 250), 6 * 7, "{:?}", greedy.0);

    // Recipients: a fresh address whose one transaction asks for 40.
    let (wide, _) = smtplib(smtp, "127.0.0.4", 1, 1, 40);
    assert_eq!(count(&wide, 450), 10, "{wide:?}");

    // Connections: 127.0.0.2 has used one of its four; of five more, three
    // are served and two hear 421 at once.
    let (connections, _) = smtplib(smtp, "127.0.0.2", 5, 0, 0);
    assert_eq!(connections, vec![421, 421], "{connections:?}");
    let (others, _) = smtplib(smtp, "127.0.0.5", 4, 0, 0);
    assert!(others.is_empty(), "{others:?}");
    let log = relay.log();
    for why in [
        "over rate_limits.messages",
        "over rate_limits.recipients",
        "over rate_limits.connections",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }
}

/// Runs `script` (Python) with `args`; returns its stdout, failing on error.
fn python(script: &str, args: &[String]) -> String {
    let output = Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Sends a command line, or message data after DATA, one byte every 0.25 s
/// (each read well within the 1 s timeout) and reports how many bytes went
/// out before the relay said 421, and what it said.
const TRICKLE: &str = r#"
import socket, sys, time
host, port, source, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), source_address=(source, 0), timeout=10)
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        line = f.readline().decode()
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return lines
reply()
if phase == "data":
    for command in ("EHLO trickle.example", "MAIL FROM:<a@example.org>",
                    "RCPT TO:<b@example.test>", "DATA"):
        s.sendall(command.encode() + b"\r\n")
        reply()
    slow = b"Subject: slow\r\n\r\n" + b"x" * 40 + b"\r\n.\r\n"
else:
    slow = b"EHLO trickle-trickle-trickle.example\r\n"
s.setblocking(False)
sent, said = 0, ""
for byte in slow:
    try:
        s.send(bytes([byte]))
        sent += 1
    except OSError:
        break
    time.sleep(0.25)
    try:
        said = s.recv(4096).decode()
    except BlockingIOError:
        continue
    if said:
        break
print(sent, len(slow), said.strip())
"#;

/// Holds `count` connections from `source` open and idle, reports how many
/// were answered 421 at once, then, with the rest still open, lets `other`
/// run one whole transaction and reports its last reply.
const IDLE_FLOOD: &str = r#"
import smtplib, socket, sys
host, port, source, count, other = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
held, refused = [], 0
for _ in range(count):
    s = socket.create_connection((host, port), source_address=(source, 0), timeout=10)
    greeting = s.recv(512).decode()
    if greeting.startswith("421"):
        refused += 1
        s.close()
    else:
        held.append(s)
c = smtplib.SMTP(host, port, source_address=(other, 0), timeout=10)
c.ehlo("other.example")
c.mail("a@example.org")
c.rcpt("b@example.test")
code, _ = c.data(b"Subject: served\r\n\r\nbody\r\n")
c.quit()
print(len(held), refused, code)
"#;

/// A client that trickles a command or its message a byte at a time (every
/// read inside the timeout) is cut off with 421 4.4.2 once a timeout passes
/// without progress (a whole command, or a line's worth of data), while a
/// client at the same time is served.
#[test]
fn trickling_and_idle_clients_cannot_hold_the_relay() {
    let relay = Relay::start(RelayConfig {
        extra_toml: "[delivery]\npaused = true\n\n\
             [policy]\nrelay_domains = [\"example.test\"]\ntrusted_networks = []\n\n\
             [limits]\ncommand_timeout = \"1s\"\ndata_timeout = \"1s\"\n\
             max_connections_per_ip = 50\n"
            .into(),
        ..RelayConfig::default()
    });
    let args = |source: &str, rest: &[&str]| -> Vec<String> {
        [
            relay.smtp.ip().to_string(),
            relay.smtp.port().to_string(),
            source.into(),
        ]
        .into_iter()
        .chain(rest.iter().map(|s| s.to_string()))
        .collect()
    };
    let (command, data, calm) = std::thread::scope(|scope| {
        let command = scope.spawn(|| python(TRICKLE, &args("127.0.0.2", &["command"])));
        let data = scope.spawn(|| python(TRICKLE, &args("127.0.0.3", &["data"])));
        let calm = scope.spawn(|| smtplib(relay.smtp, "127.0.0.4", 1, 3, 2));
        (
            command.join().unwrap(),
            data.join().unwrap(),
            calm.join().unwrap(),
        )
    });
    for (what, report) in [("command", &command), ("data", &data)] {
        eprintln!("trickled {what}: {report}");
        let mut fields = report.splitn(3, ' ');
        let sent: usize = fields.next().unwrap().parse().unwrap();
        let total: usize = fields.next().unwrap().parse().unwrap();
        let said = fields.next().unwrap_or("");
        assert!(said.starts_with("421 4.4.2"), "{what}: {report}");
        assert!(
            sent < total,
            "{what}: the whole trickle got through: {report}"
        );
    }
    assert_eq!(count(&calm.0, 250), 3 * 4, "{:?}", calm.0);
    assert!(relay.log().contains("timeout: no progress within 1s"));
}

/// Hundreds of idle connections from one address get
/// `max_connections_per_ip` slots and `421 4.7.0` beyond them; another
/// address is served in full while they are held.
#[test]
fn idle_connections_from_one_address_cannot_starve_another() {
    let relay = Relay::start(RelayConfig {
        extra_toml: "[delivery]\npaused = true\n\n\
             [policy]\nrelay_domains = [\"example.test\"]\ntrusted_networks = []\n\n\
             [limits]\nmax_connections_per_ip = 50\n"
            .into(),
        ..RelayConfig::default()
    });
    let args: Vec<String> = [
        relay.smtp.ip().to_string(),
        relay.smtp.port().to_string(),
        "127.0.0.5".into(),
        "300".into(),
        "127.0.0.6".into(),
    ]
    .into();
    let flood = python(IDLE_FLOOD, &args);
    eprintln!("idle flood (held, refused, the other's DATA reply): {flood}");
    assert_eq!(flood.trim(), "50 250 250", "{flood}");
}
