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
    for word in ["serve", "queue", "config"] {
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

#[test]
fn serve_with_flags_only_runs_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let smtp = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let child = Command::new(postern_bin())
        .arg("serve")
        .arg("--listen")
        .arg(smtp.to_string())
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--http")
        .arg(http.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("postern serve exited with {status}:\n{}", log());
        }
        matches!(http_request(http, "GET", "/readyz", &[], b""), Ok((200, _))).then_some(())
    });
    assert!(ready.is_some(), "not ready:\n{}", log());
    let (status, _) = http_request(http, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(status, 200);

    let mut client = Smtp::connect(smtp);
    client.ehlo();
    let data = crlf("Subject: embedded default\n\nhello\n");
    let reply = client.send_mail("<sender@example.org>", &["<rcpt@example.net>"], &data);
    assert_eq!(reply.code, 250, "{reply}\n{}", log());
    let id = reply.queued_id();
    // The embedded default: the local spool and a local-directory object store.
    assert!(
        data_dir.join("spool").join(format!("{id}.env")).is_file(),
        "{:?}",
        files_under(&data_dir)
    );
    let objects = files_under(&data_dir.join("objects"));
    assert!(
        objects.iter().any(|f| f.ends_with(&format!("{id}.eml"))),
        "no object-store copy under {}/objects: {objects:?}",
        data_dir.display()
    );
}
