//! `postern queue` against the real binary: a relay whose relayhost refuses
//! connections keeps its mail deferred, and every queue command is run on it
//! over the admin socket (and once over TCP and through --config).

mod common;

use common::pki;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `postern queue ARGS --data-dir DIR`.
fn queue(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(postern_bin())
        .arg("queue")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run postern queue")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(data_dir: &Path, args: &[&str]) -> String {
    let output = queue(data_dir, args);
    assert!(
        output.status.success(),
        "postern queue {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
fn fails(data_dir: &Path, args: &[&str]) -> String {
    let output = queue(data_dir, args);
    assert!(
        !output.status.success(),
        "postern queue {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stderr).unwrap()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn list(data_dir: &Path) -> Vec<Value> {
    json(&ok(data_dir, &["list", "--json"]))
        .as_array()
        .expect("list --json prints an array")
        .clone()
}

fn find<'a>(messages: &'a [Value], id: &str) -> Option<&'a Value> {
    messages.iter().find(|m| m["id"] == id)
}

/// Waits until message `id` has had at least `attempts` attempts and is
/// waiting for the next one (or is held); returns it.
fn wait_attempts(data_dir: &Path, id: &str, attempts: u64) -> Value {
    wait_for(Duration::from_secs(20), || {
        find(&list(data_dir), id)
            .filter(|m| {
                m["attempts"].as_u64() >= Some(attempts)
                    && !m["in_flight"].as_bool().unwrap()
                    && m["state"] != "active"
            })
            .cloned()
    })
    .unwrap_or_else(|| {
        panic!(
            "{id} did not reach {attempts} attempts: {:?}",
            find(&list(data_dir), id)
        )
    })
}

fn submit(relay: &Relay, from: &str, to: &[&str], subject: &str) -> String {
    let mut smtp = relay.connect();
    smtp.ehlo();
    let data = crlf(&format!(
        "From: {from}\nTo: {}\nSubject: {subject}\n\nHello.\n",
        to.join(", ")
    ));
    let from = format!("<{from}>");
    let to: Vec<String> = to.iter().map(|t| format!("<{t}>")).collect();
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    let reply = smtp.send_mail(&from, &to, &data);
    assert_eq!(reply.code, 250, "{reply}");
    smtp.cmd("QUIT");
    reply.queued_id()
}

#[test]
fn queue_commands_against_a_running_relay() {
    let closed = free_port();
    let admin = free_port();
    let mut relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nrelayhost = \"127.0.0.1:{closed}\"\nretry_schedule = [\"1h\"]\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        ),
        ..RelayConfig::default()
    });
    let dir = relay.data_dir.clone();
    let socket = dir.join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    // Anyone may connect; each request is authorized from the caller's
    // credentials (a_user_who_is_not_an_admin_is_refused_by_credentials).
    assert_eq!(mode & 0o777, 0o666, "admin.sock mode {mode:o}");

    let a = submit(
        &relay,
        "alice@example.org",
        &["bob@example.net", "carol@example.org"],
        "A",
    );
    let b = submit(&relay, "dave@example.org", &["erin@example.com"], "B");
    let c = submit(&relay, "frank@example.org", &["grace@example.com"], "C");
    for id in [&a, &b, &c] {
        wait_attempts(&dir, id, 1);
    }

    // list: oldest first, deferred with the relayhost's refusal.
    let messages = list(&dir);
    let ids: Vec<&str> = messages.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&a, &b, &c]);
    let first = &messages[0];
    assert_eq!(first["sender"], "alice@example.org");
    assert_eq!(first["state"], "deferred");
    assert_eq!(first["recipients"].as_array().unwrap().len(), 2);
    let last_error = first["last_error"].as_str().unwrap();
    assert!(
        last_error.starts_with("451 ") && last_error.contains("refused"),
        "{last_error}"
    );
    let table = ok(&dir, &["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID ") && lines[0].contains("LAST ERROR"),
        "{table}"
    );
    let row = lines[1];
    for part in [
        a.as_str(),
        "alice@example.org",
        "  2  ",
        "bob@example.net",
        "in 59m",
        "451 ",
    ] {
        assert!(row.contains(part), "list row lacks {part:?}:\n{table}");
    }
    let octets: u64 = messages.iter().map(|m| m["size"].as_u64().unwrap()).sum();
    assert_eq!(
        *lines.last().unwrap(),
        format!("-- 3 messages, 4 recipients, {octets} octets")
    );

    // show: the envelope and per-recipient state.
    let shown = json(&ok(&dir, &["show", &a, "--json"]));
    assert_eq!(shown["id"], a.as_str());
    assert_eq!(
        shown["size"].as_u64().unwrap(),
        relay.eml(&a).len() as u64,
        "size is the spooled size"
    );
    for recipient in shown["recipients"].as_array().unwrap() {
        assert_eq!(recipient["status"], "pending");
        assert_eq!(recipient["destination"], format!("127.0.0.1:{closed}"));
    }
    let text = ok(&dir, &["show", &a]);
    for part in [
        "Sender   <alice@example.org>",
        "State    deferred, 1 attempt, next in 59m",
        "carol@example.org",
        "pending",
    ] {
        assert!(text.contains(part), "show lacks {part:?}:\n{text}");
    }

    // hold: flushing a held message is refused; flushing all skips it.
    let held = json(&ok(&dir, &["hold", &b, "--json"]));
    assert_eq!(held["state"], "held");
    assert!(fails(&dir, &["flush", &b]).contains("held"));
    assert_eq!(
        ok(&dir, &["flush"]),
        "2 message(s) scheduled for delivery now\n"
    );
    wait_attempts(&dir, &a, 2);
    wait_attempts(&dir, &c, 2);
    assert_eq!(
        ok(&dir, &["flush", &c]),
        format!("{c}: delivery attempt scheduled now\n")
    );
    wait_attempts(&dir, &c, 3);
    let b_now = find(&list(&dir), &b).unwrap().clone();
    assert_eq!(b_now["attempts"], 1, "a held message was attempted");
    assert_eq!(b_now["state"], "held");

    // stats, over TCP and through --config too.
    let stats = json(&ok(&dir, &["stats", "--json"]));
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["held"], 1);
    assert_eq!(stats["deferred"], 2);
    assert_eq!(stats["active"], 0);
    assert_eq!(
        stats["destinations"],
        serde_json::json!([{ "destination": format!("127.0.0.1:{closed}"), "messages": 3, "recipients": 4 }])
    );
    assert!(stats["oldest_age_seconds"].as_u64().is_some());
    let over_tcp = ok(&dir, &["stats", "--admin", &format!("127.0.0.1:{admin}")]);
    assert!(over_tcp.contains("held      1\n"), "{over_tcp}");
    assert!(
        over_tcp.contains(&format!("127.0.0.1:{closed}  3         4\n")),
        "{over_tcp}"
    );
    assert!(over_tcp.contains("Oldest message: "), "{over_tcp}");
    let config = relay.config_path.to_str().unwrap().to_owned();
    let via_config = Command::new(postern_bin())
        .args(["queue", "list", "--json", "--config", &config])
        .output()
        .unwrap();
    assert!(via_config.status.success(), "{via_config:?}");
    assert_eq!(
        json(&String::from_utf8(via_config.stdout).unwrap())
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // The hold is persisted: it survives a restart; the socket goes with the relay.
    relay.stop();
    assert!(
        !socket.exists(),
        "admin.sock left behind after a clean stop"
    );
    let err = fails(&dir, &["list"]);
    assert!(
        err.contains("not running") && err.contains(&socket.display().to_string()),
        "{err}"
    );
    relay.restart();
    let messages = list(&dir);
    assert_eq!(messages.len(), 3);
    assert_eq!(find(&messages, &b).unwrap()["state"], "held");
    assert!(find(&messages, &a).unwrap()["attempts"].as_u64().unwrap() >= 2);

    // release: delivery is attempted at once.
    let released = json(&ok(&dir, &["release", &b, "--json"]));
    assert_ne!(released["state"], "held");
    wait_attempts(&dir, &b, 2);

    // delete: every copy goes.
    assert_eq!(ok(&dir, &["delete", &c]), format!("{c}: deleted\n"));
    assert!(find(&list(&dir), &c).is_none());
    let leftovers: Vec<String> = files_under(&dir)
        .into_iter()
        .filter(|f| f.contains(c.as_str()))
        .collect();
    assert!(leftovers.is_empty(), "copies of {c} left: {leftovers:?}");
    assert!(fails(&dir, &["delete", &c]).contains(&format!("no queued message {c}")));
    assert!(fails(&dir, &["show", "NO-SUCH-ID"]).contains("no queued message NO-SUCH-ID"));

    // delete --bounce: a DSN from <> to the sender takes its place.
    assert_eq!(
        ok(&dir, &["delete", &a, "--bounce"]),
        format!("{a}: deleted; a bounce was sent to the sender\n")
    );
    let messages = list(&dir);
    assert!(find(&messages, &a).is_none());
    let dsn = messages
        .iter()
        .find(|m| m["sender"] == "")
        .unwrap_or_else(|| panic!("no bounce queued: {messages:?}"));
    assert_eq!(dsn["recipients"][0]["address"], "alice@example.org");
    let dsn_id = dsn["id"].as_str().unwrap();
    let report = String::from_utf8_lossy(&relay.eml(dsn_id)).into_owned();
    assert!(
        report.contains("multipart/report") && report.contains("5.3.0"),
        "{report}"
    );
    assert!(
        !files_under(&dir).iter().any(|f| f.contains(a.as_str())),
        "copies of {a} left after delete --bounce"
    );
    let table = ok(&dir, &["list"]);
    assert!(table.contains("  <>  "), "{table}");

    // A relay killed with -9 leaves its socket; the next start replaces it.
    relay.kill9();
    assert!(socket.exists());
    relay.restart();
    assert_eq!(list(&dir).len(), 2);
}

#[test]
fn a_relay_that_is_not_running_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = queue(dir.path(), &["stats"]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("the relay is not running")
            && err.contains(&dir.path().join("admin.sock").display().to_string()),
        "{err}"
    );
    assert!(output.stdout.is_empty());
}

/// `postern queue ARGS --data-dir DIR` run as `nobody` (uid and gid 65534,
/// no supplementary groups), through util-linux's setpriv.
fn queue_as_nobody(data_dir: &Path, args: &[&str]) -> Output {
    // A copy nobody can execute, wherever the build tree lives.
    let binary = data_dir.join("postern-as-nobody");
    if !binary.exists() {
        std::fs::copy(postern_bin(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    Command::new(require_tool("setpriv"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&binary)
        .arg("queue")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run postern queue as nobody")
}

/// The admin socket decides from SO_PEERCRED, not from anything the client
/// sends: `nobody` is refused with a clear message, and allowed once its
/// group is the configured admin group. Root (the test) always is.
#[test]
fn a_user_who_is_not_an_admin_is_refused_by_credentials() {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        panic!("this test switches to uid 65534 with setpriv and must run as root (CI does)");
    }
    for (group, allowed) in [(None, false), (Some("nogroup"), true)] {
        let extra = group
            .map(|g| format!("[admin]\ngroup = \"{g}\"\n"))
            .unwrap_or_default();
        let relay = Relay::start(RelayConfig {
            extra_toml: format!("[delivery]\npaused = true\n\n{extra}"),
            ..RelayConfig::default()
        });
        traversable(&relay.data_dir);
        submit(&relay, "alice@example.org", &["bob@example.net"], "P");
        let output = queue_as_nobody(&relay.data_dir, &["list", "--json"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if allowed {
            assert!(output.status.success(), "group {group:?}: {stderr}");
            let listed = json(&String::from_utf8_lossy(&output.stdout));
            assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        } else {
            assert!(!output.status.success(), "nobody may not list");
            assert!(
                stderr.contains("permission denied: uid 65534"),
                "a clear refusal naming the uid: {stderr}"
            );
            assert!(
                stderr.contains("[admin] group"),
                "says how to allow: {stderr}"
            );
            // The refusal is the relay's, per request: root still may.
            assert_eq!(list(&relay.data_dir).len(), 1);
        }
    }
}

#[test]
fn a_listing_larger_than_grpcs_default_message_limit_is_printed() {
    let relay = Relay::start(RelayConfig {
        extra_toml: "[delivery]\npaused = true\n".into(),
        ..RelayConfig::default()
    });
    let recipients: Vec<String> = (0..1000)
        .map(|n| format!("<recipient-{n:04}-with-a-longer-local-part@destination-{n}.example.net>"))
        .collect();
    let recipients: Vec<&str> = recipients.iter().map(String::as_str).collect();
    let mut smtp = relay.connect();
    smtp.ehlo();
    for _ in 0..60 {
        let reply = smtp.send_mail(
            "<sender@example.org>",
            &recipients,
            b"Subject: many\r\n\r\nbody\r\n",
        );
        assert_eq!(reply.code, 250, "{reply}");
    }
    // About 7 MB of protobuf: more than tonic's default 4 MiB a client takes.
    let messages = list(&relay.data_dir);
    assert_eq!(messages.len(), 60);
    assert!(messages
        .iter()
        .all(|m| m["recipients"].as_array().is_some_and(|r| r.len() == 1000)));
}

/// `postern queue ARGS --config FILE`: the admin service found through the
/// configuration (its `[admin] listen` and `[admin.tls]` when no socket is
/// there).
fn queue_by_config(config: &Path, args: &[&str]) -> Output {
    Command::new(postern_bin())
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run postern queue")
}

/// A client's configuration: the relay's, with a data directory of its own
/// (so no socket is found and the TCP listener is used) and `tls` as its
/// `[admin.tls]`.
fn client_config(
    dir: &Path,
    admin: u16,
    tls: &postern::config::MutualTlsFiles,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("client.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:25\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[admin.tls]\ncert_file = \"{}\"\n\
             key_file = \"{}\"\nca_file = \"{}\"\n",
            dir.join("no-data").display(),
            tls.cert_file.display(),
            tls.key_file.display(),
            tls.ca_file.display()
        ),
    )
    .unwrap();
    path
}

/// `[admin] listen` with `[admin.tls]`: the queue is managed over mutual
/// TLS with a certificate from the admin CA; a client with a certificate of
/// another CA and a plaintext client are refused (the relay logs why); and
/// a listener on a non-loopback address without TLS is refused outright.
#[test]
fn the_tcp_admin_service_takes_only_clients_with_a_certificate_from_its_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let admin_ca = pki::ca("admin CA");
    let other_ca = pki::ca("another CA");
    let relay_tls = pki::member_files(pki_dir.path(), &admin_ca, "relay");
    let operator = pki::member_files(pki_dir.path(), &admin_ca, "operator");
    let mut stranger = pki::member_files(pki_dir.path(), &other_ca, "stranger");
    stranger.ca_file = operator.ca_file.clone();
    let admin = free_port();
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\npaused = true\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[admin.tls]\ncert_file = \"{}\"\n\
             key_file = \"{}\"\nca_file = \"{}\"\n",
            relay_tls.cert_file.display(),
            relay_tls.key_file.display(),
            relay_tls.ca_file.display()
        ),
        ..RelayConfig::default()
    });
    let id = submit(
        &relay,
        "alice@example.org",
        &["bob@example.net"],
        "over TLS",
    );

    let clients = tempfile::tempdir().unwrap();
    let trusted = client_config(&clients.path().join("ok"), admin, &operator);
    let output = queue_by_config(&trusted, &["list", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = json(&String::from_utf8(output.stdout).unwrap());
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");

    let untrusted = client_config(&clients.path().join("stranger"), admin, &stranger);
    let output = queue_by_config(&untrusted, &["list", "--json"]);
    assert!(!output.status.success());
    let plain = Command::new(postern_bin())
        .args(["queue", "list", "--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let refusals = wait_for(Duration::from_secs(10), || {
        let log = relay.log();
        let refused = |why: &str| {
            log.lines()
                .any(|l| l.contains("TLS handshake refused") && l.contains(why))
        };
        (refused("not from the configured CA") && refused("not TLS")).then_some(())
    });
    assert!(refusals.is_some(), "{}", relay.log());

    let open = clients.path().join("open.toml");
    std::fs::write(
        &open,
        format!(
            "data_dir = \"{}\"\n[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:25\"\n\n\
             [admin]\nlisten = \"0.0.0.0:{admin}\"\n",
            clients.path().display()
        ),
    )
    .unwrap();
    let check = Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&open)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && stderr.contains("[admin.tls]"),
        "{stderr}"
    );
}

/// `queue shape` (qshape) and the bulk forms of hold, release, flush and
/// delete, selecting by recipient domain, sender, age and state.
#[test]
fn shape_and_bulk_actions_select_by_domain_sender_age_and_state() {
    let closed = free_port();
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nrelayhost = \"127.0.0.1:{closed}\"\nretry_schedule = [\"1h\"]\n"
        ),
        ..RelayConfig::default()
    });
    let dir = relay.data_dir.clone();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(submit(
            &relay,
            "alice@x.test",
            &["r@a.test"],
            &format!("a{n}"),
        ));
    }
    for n in 0..2 {
        ids.push(submit(
            &relay,
            "",
            &["r@b.test", "s@a.test"],
            &format!("b{n}"),
        ));
    }
    for id in &ids {
        wait_attempts(&dir, id, 1);
    }

    let shape = json(&ok(&dir, &["shape", "--json"]));
    let rows: Vec<(String, u64, u64)> = shape["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["domain"].as_str().unwrap().to_owned(),
                r["total"].as_u64().unwrap(),
                r["counts"][0].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("TOTAL".to_owned(), 6, 6),
            ("a.test".to_owned(), 6, 6),
            ("b.test".to_owned(), 2, 2)
        ]
    );
    let table = ok(&dir, &["shape"]);
    eprintln!("postern queue shape:\n{table}");
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .trim_start()
            .starts_with("T 5 10 20"),
        "{table}"
    );
    let by_sender = ok(&dir, &["shape", "--by", "sender"]);
    assert!(
        by_sender.contains("x.test") && by_sender.contains("<>"),
        "{by_sender}"
    );

    // A destructive action needs an id or a selection, not both.
    assert!(fails(&dir, &["hold"]).contains("--all"));
    assert!(fails(&dir, &["hold", &ids[0], "--to", "a.test"]).contains("not both"));

    let held = ok(&dir, &["hold", "--from", "<>"]);
    assert_eq!(held, "2 of 2 selected message(s) held\n");
    let states: Vec<String> = list(&dir)
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m["id"].as_str().unwrap(),
                m["state"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        list(&dir).iter().filter(|m| m["state"] == "held").count(),
        2,
        "{states:?}"
    );
    let listed = json(&ok(&dir, &["list", "--state", "held", "--json"]));
    let mut held_ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    held_ids.sort_unstable();
    let mut expected: Vec<&str> = ids[4..].iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(held_ids, expected);
    assert!(json(&ok(&dir, &["list", "--older", "1h", "--json"]))
        .as_array()
        .unwrap()
        .is_empty());

    let flushed = json(&ok(
        &dir,
        &["flush", "--to", "a.test", "--state", "deferred", "--json"],
    ));
    assert_eq!(flushed["selected"], 4, "{flushed}");
    assert_eq!(flushed["done"], 4, "{flushed}");

    let released = ok(&dir, &["release", "--state", "held"]);
    assert_eq!(released, "2 of 2 selected message(s) released\n");
    let deleted = ok(&dir, &["delete", "--to", "b.test"]);
    assert_eq!(deleted, "2 of 2 selected message(s) deleted\n");
    let left: Vec<String> = list(&dir)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    let mut first_four = ids[..4].to_vec();
    first_four.sort();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, first_four);
    let all = ok(&dir, &["delete", "--all"]);
    assert_eq!(all, "4 of 4 selected message(s) deleted\n");
    assert!(list(&dir).is_empty());
}

/// `tmux` on a private server socket, so tests never touch another session.
fn tmux(socket: &str, args: &[&str]) -> Output {
    Command::new(require_tool("tmux"))
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("tmux")
}

/// `postern top` in a real terminal (tmux): the screen shows the queue,
/// the counters since start, the rate lines with sparklines and one row per
/// destination with its depth and oldest age; `q` ends it.
#[test]
fn top_draws_a_live_screen_in_a_real_terminal_and_quits_on_q() {
    let (closed_a, closed_b) = (free_port(), free_port());
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nretry_schedule = [\"1h\"]\n\n\
             [[route]]\ndomains = [\"a.test\"]\nnext_hop = \"127.0.0.1:{closed_a}\"\n\n\
             [[route]]\ndomains = [\"b.test\"]\nnext_hop = \"127.0.0.1:{closed_b}\"\n"
        ),
        ..RelayConfig::default()
    });
    let dir = relay.data_dir.clone();
    for n in 0..3 {
        submit(&relay, "alice@x.test", &["r@a.test"], &format!("a{n}"));
    }
    let socket = format!("postern-top-{}", std::process::id());
    let command = format!(
        "{} top --data-dir {} --interval 300ms",
        postern_bin().display(),
        dir.display()
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-x",
            "110",
            "-y",
            "30",
            "-s",
            "top",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");
    for n in 0..2 {
        submit(&relay, "bob@x.test", &["r@b.test"], &format!("b{n}"));
    }
    let screen = || {
        String::from_utf8_lossy(&tmux(&socket, &["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned()
    };
    let shown = wait_for(Duration::from_secs(20), || {
        let text = screen();
        (text.contains("accepted 5") && text.contains(&format!("127.0.0.1:{closed_b}")))
            .then_some(text)
    });
    let Some(shown) = shown else {
        let last = screen();
        let _ = tmux(&socket, &["kill-server"]);
        panic!("top never showed the queue:\n{last}");
    };
    eprintln!("postern top, as tmux captured it:\n{shown}");
    assert!(shown.starts_with("postern top  "), "{shown}");
    assert!(shown.contains("queue 5  "), "{shown}");
    for line in ["in ", "out ", "deferred "] {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(line) && l.chars().any(|c| ('▁'..='█').contains(&c))),
            "no sparkline for {line}:\n{shown}"
        );
    }
    let row = |port: u16| {
        shown
            .lines()
            .find(|l| l.starts_with(&format!("127.0.0.1:{port}")))
            .unwrap_or_else(|| panic!("no row for {port}:\n{shown}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(row(closed_a)[1..3], ["3", "3"]);
    assert_eq!(row(closed_b)[1..3], ["2", "2"]);

    let _ = tmux(&socket, &["send-keys", "-t", "top", "q"]);
    let ended = wait_for(Duration::from_secs(10), || {
        (!tmux(&socket, &["has-session", "-t", "top"])
            .status
            .success())
        .then_some(())
    });
    let _ = tmux(&socket, &["kill-server"]);
    assert!(ended.is_some(), "q did not end postern top");
}
