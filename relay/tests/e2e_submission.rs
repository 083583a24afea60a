//! Authenticated submission with real clients: swaks, msmtp and Python's
//! smtplib submit through a `submission` listener (587-style, STARTTLS) and a
//! `submissions` one (465-style, implicit TLS), with passwords hashed by
//! Dovecot's `doveadm pw` (argon2id, bcrypt, SHA-512-crypt); AUTH before
//! STARTTLS is refused; wrong passwords are slowed down and then locked
//! out, and Debian's `fail2ban-regex` finds each failure in the relay's log
//! with the shipped filter; a user may send only as its own addresses; and
//! a real Dovecot checks the passwords over its auth socket. The tools come
//! from `bash e2e/install-deps`; without them these tests fail naming the
//! install.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pki;
use common::*;

/// Users, their passwords and the `doveadm pw` scheme of their hash.
const USERS: [(&str, &str, &str); 3] = [
    ("alice", "alice-pw", "ARGON2ID"),
    ("bob", "bob-pw", "BLF-CRYPT"),
    ("carol@example.net", "carol-pw", "SHA512-CRYPT"),
];

/// `doveadm pw`'s hash of `password` with `scheme` (`{SCHEME}` prefixed).
fn hash(scheme: &str, password: &str) -> String {
    let output = Command::new(require_tool("doveadm"))
        .args(["pw", "-s", scheme, "-p", password])
        .output()
        .expect("doveadm pw");
    assert!(output.status.success(), "doveadm pw -s {scheme}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// A password file of [`USERS`], in `dir`.
fn password_file(dir: &Path) -> PathBuf {
    let text: String = USERS
        .iter()
        .map(|(user, password, scheme)| format!("{user}:{}\n", hash(scheme, password)))
        .collect();
    pki::write(dir, "passwd", &text)
}

/// A relay with an SMTP listener that relays nothing, a `submission` and a
/// `submissions` listener, and `[auth]` as given.
struct Submission {
    relay: Relay,
    submission: SocketAddr,
    submissions: SocketAddr,
    ca_file: PathBuf,
    _pki: tempfile::TempDir,
}

fn start(auth_toml: impl FnOnce(&Path) -> String) -> Submission {
    let pki_dir = tempfile::tempdir().unwrap();
    let ca = pki::ca("submission CA");
    let tls = pki::member_files(pki_dir.path(), &ca, "listener");
    let submission = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let submissions = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (cert, key) = (tls.cert_file.display(), tls.key_file.display());
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\npaused = true\n\n\
             [policy]\nrelay_domains = []\ntrusted_networks = []\n\n\
             [[listener]]\nname = \"submission\"\naddress = \"{submission}\"\nmode = \"submission\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [[listener]]\nname = \"submissions\"\naddress = \"{submissions}\"\nmode = \"submissions\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [auth]\n{}",
            auth_toml(pki_dir.path())
        ),
        ..RelayConfig::default()
    });
    Submission {
        relay,
        submission,
        submissions,
        ca_file: tls.ca_file.clone(),
        _pki: pki_dir,
    }
}

/// `[auth]` with the password file, the sender rules and a quick throttle.
fn file_auth(dir: &Path) -> String {
    format!(
        "password_file = \"{}\"\nmax_failures = 4\nfailure_delay = \"200ms\"\n\
         max_failure_delay = \"1s\"\n\n\
         [auth.senders]\nalice = [\"alice@example.org\", \"@sales.example.org\"]\n\
         bob = [\"bob@example.org\"]\n",
        password_file(dir).display()
    )
}

fn message(subject: &str) -> String {
    format!("From: someone\r\nTo: rcpt@example.test\r\nSubject: {subject}\r\n\r\nbody\r\n")
}

fn swaks(args: &[&str]) -> String {
    let output = Command::new(require_tool("swaks"))
        .args(args)
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "swaks {args:?}:\n{text}");
    text
}

/// Submits with msmtp (GnuTLS, verifying the certificate against the CA).
fn msmtp(at: SocketAddr, starttls: bool, ca_file: &Path, user: &str, password: &str, from: &str) {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("msmtprc");
    std::fs::write(
        &config,
        format!(
            "account sub\nhost 127.0.0.1\nport {}\ntls on\ntls_starttls {}\n\
             tls_trust_file {}\nauth plain\nuser {user}\npassword {password}\nfrom {from}\n\
             logfile {}\naccount default : sub\n",
            at.port(),
            if starttls { "on" } else { "off" },
            ca_file.display(),
            work.path().join("log").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut child = Command::new(require_tool("msmtp"))
        .arg("-C")
        .arg(&config)
        .arg("rcpt@example.test")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("msmtp");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message(&format!("msmtp {}", at.port())).as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let log = std::fs::read_to_string(work.path().join("log")).unwrap_or_default();
    assert!(
        output.status.success(),
        "msmtp to {at}: {}\n{log}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("msmtp to {at}: {}", log.trim());
}

/// Python's smtplib: STARTTLS + login (PLAIN) on 587, SMTP_SSL + LOGIN on 465.
const SMTPLIB: &str = r#"
import smtplib, ssl, sys
port, implicit, cafile, user, password, sender = sys.argv[1:7]
ctx = ssl.create_default_context(cafile=cafile)
if implicit == "1":
    s = smtplib.SMTP_SSL("127.0.0.1", int(port), context=ctx, timeout=30)
    s.ehlo("smtplib.example")
    s.user, s.password = user, password
    code, _ = s.auth("LOGIN", s.auth_login)
else:
    s = smtplib.SMTP("127.0.0.1", int(port), timeout=30)
    s.ehlo("smtplib.example")
    s.starttls(context=ctx)
    s.ehlo("smtplib.example")
    code, _ = s.login(user, password)
body = "Subject: smtplib %s\r\n\r\nbody\r\n" % port
s.sendmail(sender, ["rcpt@example.test"], body)
s.quit()
print(code)
"#;

fn smtplib(at: SocketAddr, implicit: bool, ca_file: &Path, user: &str, password: &str, from: &str) {
    let output = Command::new("python3")
        .args(["-c", SMTPLIB])
        .arg(at.port().to_string())
        .arg(if implicit { "1" } else { "0" })
        .arg(ca_file)
        .args([user, password, from])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "smtplib to {at}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "235");
}

#[test]
fn swaks_msmtp_and_smtplib_submit_through_587_and_465() {
    let sub = start(file_auth);
    let (p587, p465) = (
        sub.submission.port().to_string(),
        sub.submissions.port().to_string(),
    );
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &p587,
        "--tls",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "alice-pw",
        "--from",
        "alice@example.org",
        "--to",
        "rcpt@example.test",
        "--header",
        "Subject: swaks 587",
    ]);
    assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &p465,
        "--tlsc",
        "--auth",
        "LOGIN",
        "--auth-user",
        "bob",
        "--auth-password",
        "bob-pw",
        "--from",
        "bob@example.org",
        "--to",
        "rcpt@example.test",
        "--header",
        "Subject: swaks 465",
    ]);
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    msmtp(
        sub.submission,
        true,
        &sub.ca_file,
        "carol@example.net",
        "carol-pw",
        "carol@example.net",
    );
    msmtp(
        sub.submissions,
        false,
        &sub.ca_file,
        "alice",
        "alice-pw",
        "anyone@sales.example.org",
    );
    smtplib(
        sub.submission,
        false,
        &sub.ca_file,
        "bob",
        "bob-pw",
        "bob@example.org",
    );
    smtplib(
        sub.submissions,
        true,
        &sub.ca_file,
        "carol@example.net",
        "carol-pw",
        "carol@example.net",
    );

    let ids = sub.relay.wait_committed(6, Duration::from_secs(10));
    let mut seen: Vec<(String, String)> = ids
        .iter()
        .map(|id| {
            let env = sub.relay.env(id);
            let eml = String::from_utf8_lossy(&sub.relay.eml(id)).into_owned();
            assert!(
                eml.contains("with ESMTPSA id"),
                "RFC 3848 ESMTPSA in Received:\n{eml}"
            );
            (
                env["listener"].as_str().unwrap().to_owned(),
                env["client"]["auth"]
                    .as_str()
                    .unwrap_or("(none)")
                    .to_owned(),
            )
        })
        .collect();
    seen.sort();
    eprintln!("accepted (listener, user): {seen:?}");
    assert_eq!(
        seen,
        [
            ("submission", "alice"),
            ("submission", "bob"),
            ("submission", "carol@example.net"),
            ("submissions", "alice"),
            ("submissions", "bob"),
            ("submissions", "carol@example.net"),
        ]
        .map(|(l, u)| (l.to_owned(), u.to_owned()))
    );
}

/// Talks SMTP from `source` to `at`, one command at a time, starting TLS
/// at once (`implicit`) or when a command is `STARTTLS`; prints one JSON
/// line per reply: code (0 when the server closed), first line, seconds.
const CONVERSE: &str = r#"
import base64, json, socket, ssl, sys, time
host, port, source, cafile, implicit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
commands = sys.argv[6:]
ctx = ssl.create_default_context(cafile=cafile)
s = socket.create_connection((host, port), source_address=(source, 0), timeout=30)
if implicit:
    s = ctx.wrap_socket(s, server_hostname="localhost")
f = s.makefile("rb")
def reply(started):
    lines = []
    while True:
        line = f.readline().decode()
        if not line:
            return {"code": 0, "text": "closed", "secs": time.monotonic() - started, "all": lines}
        lines.append(line.strip())
        if len(line) < 4 or line[3] != "-":
            return {"code": int(line[:3]), "text": line[4:].strip(), "secs": time.monotonic() - started, "all": lines}
print(json.dumps(reply(time.monotonic())))
for command in commands:
    if command.startswith("PLAIN "):
        user, password = command[6:].split(" ", 1)
        command = "AUTH PLAIN " + base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
    started = time.monotonic()
    try:
        s.sendall(command.encode() + b"\r\n")
        r = reply(started)
    except OSError:
        r = {"code": 0, "text": "closed", "secs": 0, "all": []}
    print(json.dumps(r), flush=True)
    if r["code"] == 0:
        break
    if command == "STARTTLS" and r["code"] == 220:
        s = ctx.wrap_socket(s, server_hostname="localhost")
        f = s.makefile("rb")
"#;

fn converse(
    at: SocketAddr,
    source: &str,
    ca_file: &Path,
    implicit: bool,
    commands: &[&str],
) -> Vec<serde_json::Value> {
    let output = Command::new("python3")
        .args(["-c", CONVERSE])
        .arg(at.ip().to_string())
        .arg(at.port().to_string())
        .arg(source)
        .arg(ca_file)
        .arg(if implicit { "1" } else { "0" })
        .args(commands)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn codes(replies: &[serde_json::Value]) -> Vec<u64> {
    replies
        .iter()
        .map(|r| r["code"].as_u64().unwrap())
        .collect()
}

#[test]
fn auth_needs_tls_wrong_passwords_are_slowed_then_locked_out_and_fail2ban_sees_them() {
    let sub = start(file_auth);
    // Before STARTTLS: AUTH is not offered, and AUTH and MAIL are refused.
    let clear = converse(
        sub.submission,
        "127.0.0.2",
        &sub.ca_file,
        false,
        &[
            "EHLO c.example",
            "PLAIN alice alice-pw",
            "MAIL FROM:<alice@example.org>",
            "QUIT",
        ],
    );
    assert_eq!(codes(&clear), [220, 250, 530, 530, 221], "{clear:#?}");
    assert!(!clear[1]["all"].to_string().contains("AUTH"), "{clear:#?}");
    assert!(clear[2]["text"].as_str().unwrap().contains("STARTTLS"));

    // Four wrong passwords from 127.0.0.2: 535 after growing delays, then 421.
    let wrong = converse(
        sub.submission,
        "127.0.0.2",
        &sub.ca_file,
        false,
        &[
            "EHLO c.example",
            "STARTTLS",
            "EHLO c.example",
            "PLAIN alice guess1",
            "PLAIN alice guess2",
            "PLAIN bob guess3",
            "PLAIN nobody guess4",
            "NOOP",
        ],
    );
    assert_eq!(
        codes(&wrong),
        [220, 250, 220, 250, 535, 535, 535, 421, 0],
        "{wrong:#?}"
    );
    assert!(wrong[3]["all"].to_string().contains("AUTH PLAIN LOGIN"));
    let delays: Vec<f64> = wrong[4..8]
        .iter()
        .map(|r| r["secs"].as_f64().unwrap())
        .collect();
    eprintln!("reply times of 4 wrong passwords (s): {delays:.2?} (throttle: 0.2 doubling, at most 1, 421 at the 4th)");
    // The throttle's own delays are lower bounds (the hash adds to them).
    for (took, least) in delays.iter().zip([0.2, 0.4, 0.8, 1.0]) {
        assert!(*took >= least, "{delays:?}");
    }

    // Locked: the right password from the same address is not even checked.
    let locked = converse(
        sub.submission,
        "127.0.0.2",
        &sub.ca_file,
        false,
        &[
            "EHLO c.example",
            "STARTTLS",
            "EHLO c.example",
            "PLAIN bob bob-pw",
        ],
    );
    assert_eq!(codes(&locked), [220, 250, 220, 250, 421], "{locked:#?}");

    // Another address is served, and may send only as its user's addresses.
    let other = converse(
        sub.submissions,
        "127.0.0.3",
        &sub.ca_file,
        true,
        &[
            "EHLO c.example",
            "PLAIN bob bob-pw",
            "MAIL FROM:<alice@example.org>",
            "MAIL FROM:<>",
            "MAIL FROM:<bob@example.org>",
            "RCPT TO:<rcpt@example.test>",
            "QUIT",
        ],
    );
    assert_eq!(
        codes(&other),
        [220, 250, 235, 553, 553, 250, 250, 221],
        "{other:#?}"
    );
    let refusal = other[3]["text"].as_str().unwrap();
    assert!(
        refusal.starts_with("5.7.1 <alice@example.org>"),
        "{refusal}"
    );
    assert!(refusal.contains("bob@example.org"), "{refusal}");
    eprintln!("sender mismatch: 553 {refusal}");

    // One log line per failure and one for the locked-out attempt, each
    // found by the shipped fail2ban filter with the right address.
    let log = sub.relay.log();
    let filter = repo_root().join("deploy/fail2ban/filter.d/postern.conf");
    let output = Command::new(require_tool("fail2ban-regex"))
        .arg("-v")
        .arg(&sub.relay.log_path)
        .arg(&filter)
        .output()
        .expect("fail2ban-regex");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    let total = report
        .lines()
        .find_map(|line| line.strip_prefix("Failregex: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok());
    eprintln!(
        "fail2ban-regex: {} matched; log lines:\n{}",
        total.unwrap_or(0),
        log.lines()
            .filter(|l| l.contains("authentication"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(total, Some(5), "{report}");
    // The addresses fail2ban would ban: those under the failregex's hits.
    let banned: Vec<&str> = report
        .lines()
        .skip_while(|line| !line.starts_with("Failregex:"))
        .take_while(|line| !line.starts_with('`'))
        .filter_map(|line| line.strip_prefix("|      "))
        .filter_map(|hit| hit.split_whitespace().next())
        .collect();
    assert_eq!(banned, ["127.0.0.2"; 5], "{report}");
    assert!(!log.contains("guess1"), "a password in the log");
    assert_eq!(sub.relay.counter("postern_auth_failures_total"), 5);
}

/// A Dovecot whose only job is authentication: passwd-file users with
/// `doveadm pw` hashes, the auth-client socket under its base_dir.
struct DovecotAuth {
    socket: PathBuf,
    config: PathBuf,
    _work: tempfile::TempDir,
}

impl DovecotAuth {
    fn start() -> DovecotAuth {
        let bin = require_tool("dovecot");
        let work = tempfile::Builder::new()
            .prefix("dovecot-auth-")
            .tempdir()
            .unwrap();
        let root = work.path();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let users = password_file(root);
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = root.display();
        let config = root.join("dovecot.conf");
        std::fs::write(
            &config,
            format!(
                "base_dir = {r}/run\nstate_dir = {r}/state\nlog_path = {r}/dovecot.log\n\
                 protocols = none\nssl = no\nauth_mechanisms = plain login\n\
                 auth_failure_delay = 0\nauth_username_format = %u\n\
                 passdb {{\n  driver = passwd-file\n  args = {}\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=dovecot gid=dovecot home=/nonexistent\n}}\n",
                users.display()
            ),
        )
        .unwrap();
        let status = Command::new(&bin).arg("-c").arg(&config).status().unwrap();
        assert!(status.success(), "dovecot did not start");
        let socket = root.join("run/auth-client");
        assert!(
            wait_for(Duration::from_secs(10), || socket.exists().then_some(())).is_some(),
            "dovecot's auth-client socket did not appear"
        );
        DovecotAuth {
            socket,
            config,
            _work: work,
        }
    }
}

impl Drop for DovecotAuth {
    fn drop(&mut self) {
        common::mail::stop_dovecot(&self.config);
    }
}

#[test]
fn dovecot_checks_passwords_over_its_auth_socket() {
    let dovecot = DovecotAuth::start();
    let socket = dovecot.socket.clone();
    let sub = start(move |_| {
        format!(
            "dovecot = \"{}\"\n\n[auth.senders]\nalice = [\"alice@example.org\"]\n",
            socket.display()
        )
    });
    let right = converse(
        sub.submission,
        "127.0.0.2",
        &sub.ca_file,
        false,
        &[
            "EHLO c.example",
            "STARTTLS",
            "EHLO c.example",
            "PLAIN alice wrong",
            "PLAIN alice alice-pw",
            "QUIT",
        ],
    );
    assert_eq!(
        codes(&right),
        [220, 250, 220, 250, 535, 235, 221],
        "{right:#?}"
    );
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &sub.submissions.port().to_string(),
        "--tlsc",
        "--auth",
        "LOGIN",
        "--auth-user",
        "carol@example.net",
        "--auth-password",
        "carol-pw",
        "--from",
        "carol@example.net",
        "--to",
        "rcpt@example.test",
    ]);
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    let ids = sub.relay.wait_committed(1, Duration::from_secs(10));
    let env = sub.relay.env(ids.iter().next().unwrap());
    assert_eq!(env["client"]["auth"], "carol@example.net");
    assert!(sub
        .relay
        .log()
        .contains("SASL PLAIN authentication failed from 127.0.0.2"));
}

/// `[rate_limits]` count a password user wherever it connects from: bob's
/// fourth transaction, from a third address, hears 450 naming him, while
/// alice on another address is served in full.
#[test]
fn a_user_over_its_message_rate_is_slowed_from_any_address() {
    let sub = start(|dir| format!("{}\n[rate_limits]\nmessages = \"3/1h\"\n", file_auth(dir)));
    let send = |source: &str, user: &str, password: &str, from: &str| {
        let replies = converse(
            sub.submissions,
            source,
            &sub.ca_file,
            true,
            &[
                "EHLO c.example",
                &format!("PLAIN {user} {password}"),
                &format!("MAIL FROM:<{from}>"),
                "QUIT",
            ],
        );
        (
            replies[3]["code"].as_u64().unwrap(),
            replies[3]["text"].as_str().unwrap().to_owned(),
        )
    };
    let bob: Vec<(u64, String)> = [("127.0.0.2"), ("127.0.0.3"), ("127.0.0.2"), ("127.0.0.4")]
        .iter()
        .map(|source| send(source, "bob", "bob-pw", "bob@example.org"))
        .collect();
    let alice: Vec<u64> = (0..3)
        .map(|_| send("127.0.0.5", "alice", "alice-pw", "alice@example.org").0)
        .collect();
    eprintln!("bob from three addresses: {bob:?}; alice: {alice:?}");
    assert_eq!(
        bob.iter().map(|(code, _)| *code).collect::<Vec<_>>(),
        [250, 250, 250, 450]
    );
    assert!(bob[3].1.contains("user bob"), "{bob:?}");
    assert_eq!(alice, [250, 250, 250]);
}

/// A password file holding a plaintext password, or a hash of a scheme we
/// do not take, stops `config check` and the relay, naming the line; a
/// changed file is re-read without a restart.
#[test]
fn the_password_file_refuses_plaintext_and_is_reread_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = |passwd: &Path| {
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[[listener]]\nname = \"submission\"\naddress = \"127.0.0.1:2587\"\n\
                 mode = \"submission\"\ntls_cert = \"/nonexistent\"\ntls_key = \"/nonexistent\"\n\n\
                 [auth]\npassword_file = \"{}\"\n",
                passwd.display()
            ),
        )
        .unwrap();
        path
    };
    for (text, says) in [
        ("alice:{SSHA}abc\nbob:secret\n", "line 1"),
        (
            &format!("alice:{}\nbob:secret\n", hash("BLF-CRYPT", "x")) as &str,
            "line 2",
        ),
    ] {
        let passwd = pki::write(dir.path(), "passwd", text);
        let output = Command::new(postern_bin())
            .args(["config", "check"])
            .arg(config(&passwd))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("config check: {}", stderr.trim());
        assert!(!output.status.success());
        assert!(
            stderr.contains(says) && stderr.contains("plaintext"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("secret"),
            "the password is in the error: {stderr}"
        );
    }

    // Re-read: dave is added to the file of a running relay.
    let sub = start(file_auth);
    let passwd = sub._pki.path().join("passwd");
    let dave = || {
        codes(&converse(
            sub.submissions,
            "127.0.0.6",
            &sub.ca_file,
            true,
            &["EHLO c.example", "PLAIN dave dave-pw", "QUIT"],
        ))[2]
    };
    assert_eq!(dave(), 535);
    let mut text = std::fs::read_to_string(&passwd).unwrap();
    text.push_str(&format!("dave:{}\n", hash("SHA512-CRYPT", "dave-pw")));
    std::fs::write(&passwd, text).unwrap();
    // The file is looked at no more than once a second.
    let accepted = wait_for(Duration::from_secs(10), || (dave() == 235).then_some(()));
    assert!(accepted.is_some(), "the new user was not taken");
    assert!(sub.relay.log().contains("password file changed"));
}
