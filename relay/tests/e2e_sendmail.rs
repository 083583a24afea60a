//! `postern sendmail` end to end: real programs (Debian's bsd-mailx, git
//! send-email) submit as an ordinary user (`nobody`, through setpriv) via a
//! copy of the binary named `sendmail`; the relay learns who they are from
//! the socket's peer credentials, refuses a sender that is not theirs, and
//! records them in the Received header. With the relay down, sendmail exits 75.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::mail::*;
use common::*;

const NOBODY: u32 = 65534;

struct Setup {
    sink: Sink,
    relay: Relay,
    /// The binary, copied as `.../bin/sendmail`.
    sendmail: PathBuf,
    /// A home directory `nobody` owns.
    home: PathBuf,
    _work: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_with("")
}

/// [`setup`] with `extra` TOML in the relay's configuration.
fn setup_with(extra: &str) -> Setup {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        panic!("this test switches to uid {NOBODY} with setpriv and must run as root (CI does)");
    }
    require_tool("setpriv");
    let sink = Sink::loopback(&[]);
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "{extra}\n[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
            sink.addr
        ),
        ..RelayConfig::default()
    });
    traversable(&relay.data_dir);
    let work = tempfile::Builder::new()
        .prefix("sendmail-e2e-")
        .tempdir()
        .unwrap();
    traversable(work.path());
    let bin = work.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let sendmail = bin.join("sendmail");
    fs::copy(postern_bin(), &sendmail).unwrap();
    fs::set_permissions(&sendmail, fs::Permissions::from_mode(0o755)).unwrap();
    let home = work.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    Setup {
        sink,
        relay,
        sendmail,
        home,
        _work: work,
    }
}

impl Setup {
    /// `program args...` as `nobody`, with the relay found through
    /// POSTERN_DATA_DIR, `input` on stdin.
    fn as_nobody(&self, program: &Path, args: &[&str], input: &[u8]) -> Output {
        let mut command = Command::new(require_tool("setpriv"));
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(program)
            .args(args);
        self.run(command, input)
    }

    fn as_root(&self, program: &Path, args: &[&str], input: &[u8]) -> Output {
        let mut command = Command::new(program);
        command.args(args);
        self.run(command, input)
    }

    fn run(&self, mut command: Command, input: &[u8]) -> Output {
        let mut child = command
            .env("POSTERN_DATA_DIR", &self.relay.data_dir)
            .env("HOME", &self.home)
            .env("GIT_AUTHOR_NAME", "Nobody")
            .env("GIT_AUTHOR_EMAIL", "nobody@postern.test")
            .env("GIT_COMMITTER_NAME", "Nobody")
            .env("GIT_COMMITTER_EMAIL", "nobody@postern.test")
            .env_remove("NAME")
            .current_dir(&self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input).unwrap();
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn delivered(&self, rcpt: &str) -> (Vec<u8>, serde_json::Value) {
        wait_for(Duration::from_secs(20), || {
            self.sink.messages().into_iter().find(|(_, env)| {
                env["rcpt_tos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == rcpt)
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "nothing reached the sink for {rcpt}; log:\n{}",
                self.relay.log()
            )
        })
    }
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The first Received header (ours), unfolded.
fn our_received(eml: &[u8]) -> String {
    let text = String::from_utf8_lossy(eml);
    let start = text.find("Received:").expect("a Received header");
    let mut header = String::new();
    for line in text[start..].split("\r\n") {
        if !header.is_empty() && !line.starts_with([' ', '\t']) {
            break;
        }
        header.push_str(line.trim());
        header.push(' ');
    }
    header
}

#[test]
fn mailx_submits_as_the_user_who_ran_it() {
    let setup = setup();
    let mailrc = setup.home.join("mailrc");
    fs::write(
        &mailrc,
        format!("set sendmail={}\n", setup.sendmail.display()),
    )
    .unwrap();
    let output = setup.as_nobody(
        &PathBuf::from("/usr/bin/env"),
        &[
            &format!("MAILRC={}", mailrc.display()),
            require_tool("bsd-mailx").to_str().unwrap(),
            "-s",
            "Hello from mailx",
            "rcpt@dest.test",
        ],
        b"Sent by bsd-mailx through postern sendmail.\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let (eml, envelope) = setup.delivered("rcpt@dest.test");
    assert_eq!(envelope["mail_from"], "nobody@postern.test");
    let received = our_received(&eml);
    assert!(
        received.contains("local user nobody uid 65534") && received.contains("with ESMTPA"),
        "{received}"
    );
    let message = String::from_utf8_lossy(&eml);
    assert!(message.contains("Subject: Hello from mailx"), "{message}");
    assert!(message.contains("Sent by bsd-mailx through postern sendmail."));
    assert!(message.contains("From: "), "sendmail adds a From: header");
    assert!(message.contains("nobody@postern.test"));
}

#[test]
fn git_send_email_submits_a_patch() {
    let setup = setup();
    let repo = setup.home.join("repo");
    fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        let output = Command::new("/usr/bin/git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "Nobody")
            .env("GIT_AUTHOR_EMAIL", "nobody@postern.test")
            .env("GIT_AUTHOR_NAME", "Nobody")
            .env("GIT_AUTHOR_EMAIL", "nobody@postern.test")
            .env("GIT_COMMITTER_NAME", "Nobody")
            .env("GIT_COMMITTER_EMAIL", "nobody@postern.test")
            .output()
            .unwrap();
        assert!(output.status.success(), "git {args:?}: {}", text(&output));
    };
    git(&["init", "-q"]);
    fs::write(repo.join("README"), "postern sendmail test\n").unwrap();
    git(&["add", "README"]);
    git(&["commit", "-q", "-m", "Add a README for the sendmail test"]);
    git(&["format-patch", "-q", "-1", "-o", "../patches"]);
    let patch = fs::read_dir(setup.home.join("patches"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::set_permissions(&patch, fs::Permissions::from_mode(0o644)).unwrap();
    traversable(patch.parent().unwrap());
    let output = setup.as_nobody(
        &PathBuf::from("/usr/bin/git"),
        &[
            "send-email",
            &format!("--sendmail-cmd={}", setup.sendmail.display()),
            "--to=rcpt@dest.test",
            "--from=Nobody <nobody@postern.test>",
            "--confirm=never",
            "--suppress-cc=all",
            "--no-chain-reply-to",
            patch.to_str().unwrap(),
        ],
        b"",
    );
    assert!(output.status.success(), "{}", text(&output));
    let (eml, envelope) = setup.delivered("rcpt@dest.test");
    assert_eq!(envelope["mail_from"], "nobody@postern.test");
    assert!(our_received(&eml).contains("local user nobody uid 65534"));
    let message = String::from_utf8_lossy(&eml);
    assert!(
        message.contains("Subject: [PATCH] Add a README for the sendmail test"),
        "{message}"
    );
    assert!(message.contains("+postern sendmail test"));
}

#[test]
fn a_user_may_not_use_someone_elses_sender_but_root_may() {
    let setup = setup();
    let message = b"Subject: forged\n\nI am not root.\n";
    let output = setup.as_nobody(
        &setup.sendmail,
        &["-i", "-f", "root@postern.test", "rcpt@dest.test"],
        message,
    );
    assert_eq!(output.status.code(), Some(77), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("553") && stderr.contains("may only send as"),
        "{stderr}"
    );
    // The null sender is for trusted users too.
    let output = setup.as_nobody(
        &setup.sendmail,
        &["-i", "-f", "<>", "rcpt@dest.test"],
        message,
    );
    assert_eq!(output.status.code(), Some(77), "{}", text(&output));
    // Root is trusted: any sender.
    let output = setup.as_root(
        &setup.sendmail,
        &["-i", "-f", "boss@elsewhere.example", "other@dest.test"],
        b"Subject: from root\n\nRoot may.\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let (eml, envelope) = setup.delivered("other@dest.test");
    assert_eq!(envelope["mail_from"], "boss@elsewhere.example");
    assert!(our_received(&eml).contains("local user root uid 0"));
    assert!(
        setup.sink.messages_for("rcpt@dest.test").is_empty(),
        "the forged messages went nowhere"
    );
}

#[test]
fn extracted_recipients_lose_the_bcc_header_and_smtp_on_stdin_works() {
    let setup = setup();
    let output = setup.as_nobody(
        &setup.sendmail,
        &["-t", "-oi"],
        b"To: A <a@dest.test>\nCc: b@dest.test\nBcc: hidden@dest.test\nSubject: -t\n\nbody\n.\nafter a dot line\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let (eml, envelope) = setup.delivered("hidden@dest.test");
    let mut rcpts: Vec<String> = envelope["rcpt_tos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["a@dest.test", "b@dest.test", "hidden@dest.test"]);
    let message = String::from_utf8_lossy(&eml);
    assert!(!message.contains("Bcc:"), "{message}");
    assert!(
        message.contains("\r\n.\r\nafter a dot line"),
        "-oi keeps the dot line: {message}"
    );

    // -bs: the caller speaks SMTP on stdin/stdout, already authenticated.
    let script = format!(
        r#"
import subprocess, sys
p = subprocess.Popen([{bin:?}, "-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def reply():
    lines = []
    while True:
        line = p.stdout.readline().decode()
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "".join(lines)
def cmd(text, code):
    p.stdin.write((text + "\r\n").encode()); p.stdin.flush()
    r = reply()
    assert r.startswith(code), (text, r)
assert reply().startswith("220")
cmd("EHLO client.local", "250")
cmd("MAIL FROM:<nobody@postern.test>", "250")
cmd("RCPT TO:<bs@dest.test>", "250")
cmd("DATA", "354")
cmd("Subject: over -bs\r\n\r\nspoken SMTP\r\n.", "250")
cmd("QUIT", "221")
"#,
        bin = setup.sendmail.display().to_string()
    );
    // Debian's python3: a pyenv shim under /root is out of nobody's reach.
    let output = setup.as_nobody(&PathBuf::from("/usr/bin/python3"), &["-c", &script], b"");
    assert!(output.status.success(), "{}", text(&output));
    let (eml, _) = setup.delivered("bs@dest.test");
    assert!(our_received(&eml).contains("local user nobody uid 65534"));
}

#[test]
fn with_the_relay_down_sendmail_exits_75_and_says_nothing_was_sent() {
    let mut setup = setup();
    setup.relay.stop();
    let output = setup.as_nobody(
        &setup.sendmail,
        &["-i", "rcpt@dest.test"],
        b"Subject: nobody home\n\nhello\n",
    );
    assert_eq!(output.status.code(), Some(75), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NOT sent"), "{stderr}");
    assert!(stderr.contains("submit.sock"), "names the socket: {stderr}");
}

#[test]
fn one_local_user_cannot_take_every_submission_slot() {
    let setup = setup_with("[limits]\nmax_connections_per_ip = 1\n");
    let socket = setup.relay.data_dir.join("submit.sock");
    let greeting = |stream: &std::os::unix::net::UnixStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).unwrap();
        line
    };
    // Root holds the one slot a user gets...
    let first = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    assert!(greeting(&first).starts_with("220 "));
    let second = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let refused = greeting(&second);
    assert!(
        refused.starts_with("421 4.7.0 Too many connections from your user"),
        "{refused}"
    );
    // ...and another user still gets in.
    let output = setup.as_nobody(
        &setup.sendmail,
        &["-i", "rcpt@dest.test"],
        b"Subject: slot\n\nhi\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    setup.delivered("rcpt@dest.test");
    drop(first);
}
