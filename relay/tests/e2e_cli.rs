//! The command-line contract of the real `postern` binary: `--help`,
//! `config check`, and `serve` driven by flags alone (the embedded default).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn help_names_every_command() {
    let (ok, output) = run(Command::new(postern_bin()).arg("--help"));
    assert!(ok, "postern --help failed:\n{output}");
    for word in ["serve", "queue", "top", "config"] {
        assert!(
            output.contains(word),
            "--help does not mention `{word}`:\n{output}"
        );
    }
    let (ok, output) = run(Command::new(postern_bin()).args(["serve", "--help"]));
    assert!(ok, "postern serve --help failed:\n{output}");
    for flag in ["--config", "--listen", "--data-dir", "--http"] {
        assert!(
            output.contains(flag),
            "serve --help does not mention `{flag}`:\n{output}"
        );
    }
}

#[test]
fn config_check_accepts_a_good_file_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_file(
        dir.path(),
        "good.toml",
        b"[[listener]]\naddress = \"127.0.0.1:2600\"\n[spool]\ncopies = [\"local\"]\nrequired = 1\ndeadline = \"5s\"\n",
    );
    let (ok, output) = run(Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&good));
    assert!(ok, "a valid config was refused:\n{output}");
    assert!(
        output.contains("warning: policy.postmaster is not set"),
        "no warning about the missing postmaster:\n{output}"
    );
    let with_postmaster = write_file(
        dir.path(),
        "postmaster.toml",
        b"[policy]\npostmaster = \"ops@example.org\"\n",
    );
    let (ok, output) = run(Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&with_postmaster));
    assert!(ok, "a valid config was refused:\n{output}");
    assert!(!output.contains("warning"), "{output}");
    let bad_postmaster = write_file(
        dir.path(),
        "bad-postmaster.toml",
        b"[policy]\npostmaster = \"ops\"\n",
    );
    let (ok, output) = run(Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&bad_postmaster));
    assert!(!ok, "postmaster without a domain was accepted:\n{output}");
    assert!(output.contains("policy.postmaster \"ops\""), "{output}");

    let unknown = write_file(
        dir.path(),
        "unknown.toml",
        b"[limits]\nmax_mesage_size = 1000000\n",
    );
    let (ok, output) = run(Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&unknown));
    assert!(!ok, "a misspelt key was accepted:\n{output}");
    assert!(
        output.contains("max_mesage_size"),
        "the error does not name the key:\n{output}"
    );

    let quorum = write_file(
        dir.path(),
        "quorum.toml",
        b"[spool]\ncopies = [\"local\"]\nrequired = 2\n",
    );
    let (ok, output) = run(Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&quorum));
    assert!(!ok, "an impossible quorum was accepted:\n{output}");
    assert!(
        output.contains("required"),
        "the error does not name the field:\n{output}"
    );
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `postern serve` with `args` in `dir` until `/readyz` answers 200;
/// returns the process and a reader of its log (stdout and stderr).
fn serve_until_ready(
    dir: &std::path::Path,
    http: SocketAddr,
    args: &[std::ffi::OsString],
) -> (Killed, impl Fn() -> String) {
    let log_path = dir.join("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(postern_bin())
        .arg("serve")
        .args(args)
        .arg("--http")
        .arg(http.to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("postern serve exited with {status}:\n{}", log());
        }
        matches!(http_request(http, "GET", "/readyz", &[], b""), Ok((200, _))).then_some(())
    });
    assert!(ready.is_some(), "not ready:\n{}", log());
    (child, log)
}

/// The `delivery: ...` line of a log.
fn delivery_line(log: &str) -> &str {
    log.lines()
        .find(|line| line.contains("delivery: "))
        .unwrap_or_else(|| panic!("no `delivery:` line in the log:\n{log}"))
}

#[test]
fn serve_with_flags_only_runs_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (_child, log) = serve_until_ready(
        dir.path(),
        http,
        &[
            "--listen".into(),
            smtp.to_string().into(),
            "--data-dir".into(),
            data_dir.clone().into(),
        ],
    );
    let (status, _) = http_request(http, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 200);
    // Where mail goes is said once, at start: by MX, through the system resolver.
    let line = delivery_line(&log()).to_owned();
    assert!(
        line.contains(
            "delivery: all mail by MX lookup (port 25) with the system resolver (/etc/resolv.conf"
        ),
        "{line}"
    );
    assert_eq!(log().matches("delivery: ").count(), 1, "{}", log());
    assert!(
        log().contains("policy.postmaster is not set"),
        "no warning about the postmaster:\n{}",
        log()
    );

    let mut client = Smtp::connect(smtp);
    client.ehlo();
    let data = crlf("Subject: embedded default\n\nhello\n");
    let reply = client.send_mail("<sender@example.org>", &["<rcpt@example.net>"], &data);
    assert_eq!(reply.code, 250, "{reply}\n{}", log());
    let id = reply.queued_id();
    // The embedded default: one durable local copy, no object store.
    assert!(
        postern::spool::local::shard_dir(&data_dir.join("spool"), &id)
            .join(format!("{id}.msg"))
            .is_file(),
        "{:?}",
        files_under(&data_dir)
    );
    assert!(
        files_under(&data_dir.join("objects")).is_empty(),
        "the default wrote an object-store copy: {:?}",
        files_under(&data_dir)
    );
    let line = log();
    assert!(
        line.contains("copies=[Local]"),
        "the start-up log does not name the one local copy:\n{line}"
    );
}

#[test]
fn serve_names_routes_relayhost_and_pause_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = write_file(
        dir.path(),
        "postern.toml",
        format!(
            "data_dir = {:?}\n[[listener]]\naddress = \"{smtp}\"\n\
             [policy]\npostmaster = \"ops@example.org\"\n\
             [delivery]\npaused = true\n\
             [[route]]\ndomains = [\"example.org\"]\nnext_hop = \"unix:/run/lmtp\"\nprotocol = \"lmtp\"\n",
            dir.path().join("data")
        )
        .as_bytes(),
    );
    let (_child, log) = serve_until_ready(
        dir.path(),
        http,
        &[
            "--config".into(),
            config.into(),
            "--relayhost".into(),
            "[127.0.0.1]:2526".into(),
        ],
    );
    let line = delivery_line(&log()).to_owned();
    assert!(
        line.ends_with(
            "delivery: PAUSED (delivery.paused = true): mail is accepted and queued but nothing \
             is delivered; unpaused it would go: 1 static route (example.org -> unix:/run/lmtp \
             (lmtp)); every other domain to relayhost [127.0.0.1]:2526 (no MX lookup)"
        ),
        "{line}"
    );
    assert!(!log().contains("policy.postmaster is not set"), "{}", log());
}
