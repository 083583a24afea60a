//! End-to-end delivery: the real binary delivering to real peers — an aiosmtpd
//! sink (e2e/sink.py), Postfix's smtp-sink, Dovecot's LMTP server, and MX
//! records served by dnsmasq on loopback — with retries, bounces (DSNs parsed
//! by Python's email package), expiry, and kill -9 during delivery.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::dns::Dns;
use common::mail::*;
use common::*;

const SENDER: &str = "sender@origin.test";

/// A relay that delivers, with fast retries.
fn delivering_relay(delivery_toml: &str) -> Relay {
    Relay::start(RelayConfig {
        extra_toml: delivery_toml.to_owned(),
        ..RelayConfig::default()
    })
}

fn message(subject: &str) -> Vec<u8> {
    crlf(&format!(
        "From: <{SENDER}>\nTo: <rcpt@dest.test>\nSubject: {subject}\nMessage-ID: <{subject}@origin.test>\n\n\
         Body line one.\n.A line that starts with a dot\n..and one with two\n\nLast line.\n"
    ))
}

fn submit(relay: &Relay, rcpts: &[&str], data: &[u8]) -> String {
    let mut smtp = relay.connect();
    smtp.ehlo();
    let rcpts: Vec<String> = rcpts.iter().map(|r| format!("<{r}>")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let reply = smtp.send_mail(&format!("<{SENDER}>"), &rcpts, data);
    assert_eq!(reply.code, 250, "submission refused: {reply}");
    reply.queued_id()
}

#[test]
fn delivers_to_an_smtp_sink_byte_for_byte_and_cleans_up() {
    let sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!("[delivery]\nrelayhost = \"{}\"\n", sink.addr));
    let data = message("plain");
    let id = submit(&relay, &["rcpt@dest.test"], &data);
    let got = sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    // What arrives is our Received: header, then exactly what was sent.
    assert_eq!(
        strip_received(&got),
        &data[..],
        "relay log:\n{}",
        relay.log()
    );
    assert!(contains(&got, format!("id {id}").as_bytes()));
    assert!(
        wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
            .then_some(()))
        .is_some(),
        "copies left after delivery: {:?}",
        files_under(&relay.data_dir)
    );
    assert!(files_under(&relay.objects_dir())
        .iter()
        .all(|f| !f.contains(&id)));
    let metrics = http_get_text(relay.http, "/metrics");
    assert!(
        metrics.contains("postern_recipients_delivered_total 1\n"),
        "{metrics}"
    );
}

/// Stops `relay`, flips a byte near the end of message `id`'s data (as
/// a failing disk would; the seal after it stays intact), and starts it
/// again delivering to `sink`.
fn flip_a_byte_while_down_then_deliver_to(relay: &mut Relay, id: &str, sink: &Sink) {
    relay.stop();
    let path = relay.spool_file(id);
    let data_len = relay.eml(id).len();
    let mut bytes = fs::read(&path).unwrap();
    let at = data_len - 5;
    bytes[at] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    let config = fs::read_to_string(&relay.config_path).unwrap().replace(
        "[delivery]\npaused = true\n",
        &format!("[delivery]\nrelayhost = \"{}\"\n", sink.addr),
    );
    fs::write(&relay.config_path, config).unwrap();
    relay.restart();
}

/// Start reads no message body (so a deep queue is back at once); a byte
/// flipped on disk while the relay was down is found before delivery: that
/// message goes to quarantine with a log line, the others are delivered.
#[test]
fn a_byte_flipped_while_down_is_quarantined_before_delivery_not_sent() {
    let sink = Sink::loopback(&[]);
    let mut relay = Relay::start(RelayConfig {
        copies: vec!["local"],
        required: 1,
        ..RelayConfig::default()
    });
    submit(&relay, &["rcpt@dest.test"], &message("intact"));
    let bad = submit(&relay, &["other@dest.test"], &message("damaged"));
    flip_a_byte_while_down_then_deliver_to(&mut relay, &bad, &sink);

    sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    let quarantine = relay.data_dir.join("quarantine");
    let quarantined = wait_for(Duration::from_secs(20), || {
        let files = files_under(&quarantine);
        (files.len() == 1).then_some(files)
    })
    .unwrap_or_else(|| panic!("nothing quarantined; log:\n{}", relay.log()));
    assert!(
        quarantined.iter().all(|f| f.starts_with(&bad)),
        "{quarantined:?}"
    );
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("quarantining a damaged spool record")
                && l.contains(&bad)
                && l.contains("SHA-256")),
        "{log}"
    );
    assert!(sink.messages_for("other@dest.test").is_empty());
    let metrics = http_get_text(relay.http, "/metrics");
    assert!(
        metrics.contains("postern_messages_quarantined_total 1\n"),
        "{metrics}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
            .then_some(()))
        .is_some(),
        "{:?}",
        files_under(&relay.data_dir)
    );
}

/// With an object copy beside the local one (the test default: a local
/// directory standing for another disk), a byte flipped on disk while the
/// relay was down is repaired from that copy before delivery: the next hop
/// gets the original bytes, the damaged file stays in quarantine, and the
/// repair is logged and counted.
#[test]
fn a_byte_flipped_while_down_is_repaired_from_the_object_copy_and_delivered_intact() {
    let sink = Sink::loopback(&[]);
    let mut relay = Relay::start(RelayConfig::default());
    let original = message("repaired");
    let id = submit(&relay, &["rcpt@dest.test"], &original);
    flip_a_byte_while_down_then_deliver_to(&mut relay, &id, &sink);

    let got = sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\r\nLast line.\r\n"), "{text}");
    assert!(text.contains("Subject: repaired\r\n"), "{text}");
    let quarantined = files_under(&relay.data_dir.join("quarantine"));
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(
        quarantined[0].contains(&format!("{id}.msg")),
        "{quarantined:?}"
    );
    let log = relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("repaired a damaged spool record") && l.contains(&id)),
        "{log}"
    );
    let metrics = http_get_text(relay.http, "/metrics");
    assert!(
        metrics.contains("postern_messages_repaired_total 1\n"),
        "{metrics}"
    );
    assert!(
        wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
            .then_some(()))
        .is_some(),
        "{:?}",
        files_under(&relay.data_dir)
    );
}

/// swaks from 127.0.0.2, which these relays do not trust (only 127.0.0.1/32
/// is), to `rcpt`; returns (success, swaks' transcript).
fn swaks_untrusted(relay: &Relay, rcpt: &str, data: &[u8]) -> (bool, String) {
    let work = tempfile::tempdir().unwrap();
    // swaks sends the file and then CRLF.CRLF itself.
    let file = write_file(work.path(), "data", data.strip_suffix(b"\r\n").unwrap());
    run(Command::new(require_tool("swaks"))
        .args(["--server", &relay.smtp.to_string()])
        .args(["--local-interface", "127.0.0.2"])
        .args(["--helo", "stranger.test", "--from", SENDER, "--to", rcpt])
        .arg("--data")
        .arg(format!("@{}", file.display())))
}

const UNTRUSTED_TOML: &str = "[policy]\ntrusted_networks = [\"127.0.0.1/32\"]\n";

#[test]
fn an_untrusted_clients_mail_to_the_postmaster_reaches_policy_postmaster() {
    let sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!(
        "{UNTRUSTED_TOML}postmaster = \"ops@ops.test\"\n[delivery]\nrelayhost = \"{}\"\n",
        sink.addr
    ));
    // 127.0.0.2 really is untrusted: other domains are refused.
    let (ok, output) = swaks_untrusted(&relay, "someone@elsewhere.test", &message("denied"));
    assert!(!ok, "relayed for an untrusted client:\n{output}");
    assert!(
        output.contains("554 5.7.1 <someone@elsewhere.test>: Relay access denied"),
        "{output}"
    );
    for (rcpt, subject) in [
        ("postmaster", "bare"),
        ("PostMaster@postern.test", "qualified"),
    ] {
        let data = message(subject);
        let (ok, output) = swaks_untrusted(&relay, rcpt, &data);
        assert!(
            ok,
            "swaks to {rcpt}:\n{output}\nrelay log:\n{}",
            relay.log()
        );
        assert!(
            output.contains(&format!("RCPT TO:<{rcpt}>")) && output.contains("250 2.1.5"),
            "{output}"
        );
        let id = queued_id(&output).unwrap_or_else(|| panic!("no `queued as`:\n{output}"));
        // Delivered to the configured mailbox, the message as it was sent.
        let got = wait_for(Duration::from_secs(20), || {
            sink.messages_for("ops@ops.test")
                .into_iter()
                .find(|eml| contains(eml, format!("id {id}").as_bytes()))
        })
        .unwrap_or_else(|| panic!("{id} did not reach ops@ops.test; log:\n{}", relay.log()));
        assert_eq!(strip_received(&got), &data[..]);
    }
    assert_eq!(sink.messages().len(), 2, "{:?}", sink.messages());
    let log = relay.log();
    assert!(
        log.contains("postmaster mail goes to policy.postmaster client=127.0.0.2:"),
        "{log}"
    );
}

#[test]
fn without_policy_postmaster_an_untrusted_client_is_told_why() {
    let relay = delivering_relay(&format!("{UNTRUSTED_TOML}[delivery]\npaused = true\n"));
    let (ok, output) = swaks_untrusted(&relay, "postmaster", &message("nobody"));
    assert!(!ok, "accepted with no postmaster set:\n{output}");
    assert!(
        output.contains(
            "550 5.1.1 <postmaster>: This relay has no postmaster mailbox: its operator has \
             not set policy.postmaster"
        ),
        "{output}"
    );
    assert!(relay.committed().is_empty());
}

fn http_get_text(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http_request(addr, "GET", path, &[], b"").unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

#[test]
fn delivers_to_postfix_smtp_sink() {
    // smtp-sink offers no CHUNKING, so this is the DATA path; -d dumps what it got.
    let work = tempfile::tempdir().unwrap();
    let dump = work.path().join("dump");
    fs::create_dir(&dump).unwrap();
    let port = free_port();
    let mut sink = Command::new(require_tool("smtp-sink"))
        .args(["-u", "root", "-d"])
        .arg(format!("{}/%M.", dump.display()))
        .arg(format!("127.0.0.1:{port}"))
        .arg("10")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let relay = delivering_relay(&format!("[delivery]\nrelayhost = \"127.0.0.1:{port}\"\n"));
    let data = message("bdat");
    submit(&relay, &["rcpt@dest.test"], &data);
    let dumped = wait_for(Duration::from_secs(20), || {
        let files = files_under(&dump);
        files.first().map(|f| fs::read(dump.join(f)).unwrap())
    });
    let _ = sink.kill();
    let _ = sink.wait();
    let dumped =
        dumped.unwrap_or_else(|| panic!("nothing reached smtp-sink; relay log:\n{}", relay.log()));
    // smtp-sink's dump starts with its own trace lines, then our message.
    let text = String::from_utf8_lossy(&dumped);
    assert!(text.contains("Subject: bdat"), "{text}");
    assert!(relay.log().contains("via DATA"), "{}", relay.log());
    assert!(text.contains(".A line that starts with a dot"), "{text}");
}

#[test]
fn mx_preference_order_and_fallback_to_the_second_mx() {
    let port = free_port();
    // Both MX hosts listen: the preferred one (10) gets the mail.
    let best = Sink::start(SocketAddr::from(([127, 0, 0, 2], port)), &[]);
    let second = Sink::start(SocketAddr::from(([127, 0, 0, 3], port)), &[]);
    let dns = Dns::start(&[
        "--mx-host=both.test,mx2.both.test,20".into(),
        "--mx-host=both.test,mx1.both.test,10".into(),
        "--host-record=mx1.both.test,127.0.0.2".into(),
        "--host-record=mx2.both.test,127.0.0.3".into(),
        // fallback.test's preferred MX (127.0.0.4) refuses connections.
        "--mx-host=fallback.test,mx1.fallback.test,10".into(),
        "--mx-host=fallback.test,mx2.fallback.test,20".into(),
        "--host-record=mx1.fallback.test,127.0.0.4".into(),
        "--host-record=mx2.fallback.test,127.0.0.3".into(),
    ]);
    let relay = delivering_relay(&format!(
        "[delivery]\nmx_port = {port}\nretry_schedule = [\"1s\"]\n\n[dns]\nnameservers = [\"{}\"]\n",
        dns.addr
    ));
    submit(&relay, &["a@both.test"], &message("mx-order"));
    best.wait_for_rcpt("a@both.test", Duration::from_secs(20));
    assert!(second.messages_for("a@both.test").is_empty());

    submit(&relay, &["b@fallback.test"], &message("mx-fallback"));
    second.wait_for_rcpt("b@fallback.test", Duration::from_secs(20));
    assert!(best.messages_for("b@fallback.test").is_empty());
    let log = relay.log();
    assert!(
        log.contains("127.0.0.4"),
        "the preferred MX was not tried first:\n{log}"
    );
}

#[test]
fn null_mx_bounces_with_one_dsn() {
    let sender_sink = Sink::loopback(&[]);
    let dns = Dns::start(&[
        // RFC 7505: one MX of preference 0 pointing at the root.
        "--dns-rr=nullmx.test,15,000000".into(),
    ]);
    let relay = delivering_relay(&format!(
        "[delivery]\nretry_schedule = [\"1s\"]\n\n[dns]\nnameservers = [\"{}\"]\n\n\
         [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\n",
        dns.addr, sender_sink.addr
    ));
    submit(&relay, &["nobody@nullmx.test"], &message("null-mx"));
    let dsn = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(20));
    let report = parse_dsn(&dsn);
    assert_eq!(
        report["recipients"][0]["Final-Recipient"],
        "rfc822; nobody@nullmx.test"
    );
    assert_eq!(report["recipients"][0]["Status"], "5.1.10");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sender_sink.messages_for(SENDER).len(), 1, "exactly one DSN");
}

#[test]
fn next_hop_down_is_retried_and_delivered_when_it_returns() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay = delivering_relay(&format!(
        "[delivery]\nrelayhost = \"{addr}\"\nretry_schedule = [\"1s\"]\n"
    ));
    let id = submit(&relay, &["rcpt@dest.test"], &message("retry"));
    // Wait for two failed attempts (the queue shows a state once it is journaled).
    let state = wait_for(Duration::from_secs(20), || {
        let state = queue_show(&relay, &id)?;
        (state["attempts"].as_u64()? >= 2).then_some(state)
    })
    .unwrap_or_else(|| panic!("no deferred attempts recorded; log:\n{}", relay.log()));
    assert_eq!(state["recipients"][0]["status"], "pending");
    assert!(
        state["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .starts_with("451 4.4.1"),
        "{state}"
    );
    assert!(relay.committed().contains(&id));
    let stats: serde_json::Value =
        serde_json::from_str(&http_get_text(relay.http, "/stats")).unwrap();
    assert_eq!(stats["queue_depth"], 1, "{stats}");
    assert_eq!(stats["state_records"], 1, "{stats}");
    assert_eq!(stats["ready"], true);
    assert!(
        stats["oldest_message_time"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{stats}"
    );
    let sink = Sink::start(addr, &[]);
    sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    let stats = wait_for(Duration::from_secs(5), || {
        let stats: serde_json::Value =
            serde_json::from_str(&http_get_text(relay.http, "/stats")).ok()?;
        (stats["queue_depth"] == 0).then_some(stats)
    });
    assert!(stats.is_some_and(|s| s["oldest_message_time"].is_null()));
}

#[test]
fn mixed_outcomes_one_transaction_and_exactly_one_dsn() {
    // good: accepted; bad: 550 at RCPT; later: 451 twice, then accepted.
    let sink = Sink::loopback(&[
        "--reject",
        "^bad@",
        "--defer",
        "^later@",
        "--defer-times",
        "2",
    ]);
    let relay = delivering_relay(&format!(
        "[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
        sink.addr
    ));
    let data = message("mixed");
    let id = submit(
        &relay,
        &["good@dest.test", "bad@dest.test", "later@dest.test"],
        &data,
    );
    let good = sink.wait_for_rcpt("good@dest.test", Duration::from_secs(20));
    assert_eq!(strip_received(&good), &data[..]);
    let later = sink.wait_for_rcpt("later@dest.test", Duration::from_secs(30));
    assert_eq!(strip_received(&later), &data[..]);
    let dsn = sink.wait_for_rcpt(SENDER, Duration::from_secs(20));
    let report = parse_dsn(&dsn);
    assert_eq!(report["to"], format!("<{SENDER}>"));
    assert_eq!(report["auto_submitted"], "auto-replied");
    let recipients = report["recipients"].as_array().unwrap();
    assert_eq!(
        recipients.len(),
        1,
        "only the refused recipient is reported: {report}"
    );
    assert_eq!(recipients[0]["Final-Recipient"], "rfc822; bad@dest.test");
    assert_eq!(recipients[0]["Action"], "failed");
    assert_eq!(recipients[0]["Status"], "5.1.1");
    assert!(recipients[0]["Diagnostic-Code"]
        .as_str()
        .unwrap()
        .contains("550 5.1.1"));
    assert_eq!(report["returned"], "message/rfc822");
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    // Each recipient exactly once; the DSN came from <> and only once.
    let all = sink.messages();
    assert_eq!(sink.messages_for("good@dest.test").len(), 1);
    assert_eq!(sink.messages_for("later@dest.test").len(), 1);
    assert_eq!(sink.messages_for(SENDER).len(), 1);
    let dsn_env = &all
        .iter()
        .find(|(_, env)| env["rcpt_tos"][0] == SENDER)
        .unwrap()
        .1;
    assert_eq!(dsn_env["mail_from"], "<>");
    let log = relay.log();
    assert!(log.contains(&format!("id={id}")), "{log}");
}

#[test]
fn expired_message_bounces() {
    let sender_sink = Sink::loopback(&[]);
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay = delivering_relay(&format!(
        "[delivery]\nretry_schedule = [\"1s\"]\nmax_age = \"3s\"\n\n\
         [[route]]\ndomains = [\"dest.test\"]\nnext_hop = \"{dead}\"\n\n\
         [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\n",
        sender_sink.addr
    ));
    submit(&relay, &["rcpt@dest.test"], &message("expiry"));
    let dsn = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(30));
    let report = parse_dsn(&dsn);
    assert_eq!(
        report["recipients"][0]["Final-Recipient"],
        "rfc822; rcpt@dest.test"
    );
    assert_eq!(report["recipients"][0]["Action"], "failed");
    assert!(report["recipients"][0]["Diagnostic-Code"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
}

#[test]
fn null_sender_never_gets_a_bounce() {
    let sink = Sink::loopback(&["--reject", "^bad@"]);
    let relay = delivering_relay(&format!("[delivery]\nrelayhost = \"{}\"\n", sink.addr));
    let mut smtp = relay.connect();
    smtp.ehlo();
    let reply = smtp.send_mail("<>", &["<bad@dest.test>"], &message("null-sender"));
    assert_eq!(reply.code, 250);
    assert!(wait_for(Duration::from_secs(15), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        sink.messages().is_empty(),
        "a bounce was sent for a null sender"
    );
}

#[test]
fn kill_9_during_delivery_loses_nothing() {
    // The sink stalls 3 s before answering the data; the relay dies meanwhile.
    let sink = Sink::loopback(&["--data-delay", "3"]);
    let mut relay = delivering_relay(&format!(
        "[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
        sink.addr
    ));
    let data = message("kill-9");
    let id = submit(&relay, &["rcpt@dest.test"], &data);
    assert!(wait_for(Duration::from_secs(10), || relay
        .log()
        .contains("accepted")
        .then_some(()))
    .is_some());
    std::thread::sleep(Duration::from_millis(1500));
    relay.kill9();
    assert!(
        relay.committed().contains(&id),
        "the message must still be spooled"
    );
    relay.restart();
    sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(30));
    assert!(wait_for(Duration::from_secs(30), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    let copies = sink.messages_for("rcpt@dest.test");
    assert!((1..=2).contains(&copies.len()), "{} copies", copies.len());
    for copy in copies {
        assert_eq!(strip_received(&copy), &data[..]);
    }
}

/// SIGTERM with a backlog: the relay finishes the attempts in progress and
/// exits, the rest staying queued for the next start (it used to take every
/// due message first, and delivered the whole queue before it exited).
#[test]
fn sigterm_with_a_backlog_stops_after_the_attempts_in_progress() {
    const QUEUED: usize = 20;
    let sink = Sink::loopback(&["--data-delay", "1"]);
    let mut relay = Relay::start(RelayConfig {
        copies: vec!["local"],
        required: 1,
        ..RelayConfig::default()
    });
    let ids: Vec<String> = (0..QUEUED)
        .map(|i| {
            submit(
                &relay,
                &["rcpt@dest.test"],
                &message(&format!("backlog {i}")),
            )
        })
        .collect();
    relay.stop();
    let config = fs::read_to_string(&relay.config_path).unwrap().replace(
        "[delivery]\npaused = true\n",
        &format!(
            "[delivery]\nrelayhost = \"{}\"\nmax_concurrency = 2\nmax_per_destination = 2\n",
            sink.addr
        ),
    );
    fs::write(&relay.config_path, config).unwrap();
    relay.restart();
    assert!(
        wait_for(Duration::from_secs(20), || relay
            .log()
            .contains("delivered: 250")
            .then_some(()))
        .is_some(),
        "nothing delivered: {}",
        relay.log()
    );
    relay.stop();
    let log = relay.log();
    assert!(log.contains("INFO stopped"), "no clean exit:\n{log}");
    let delivered = sink.messages().len();
    let queued = relay.committed();
    assert_eq!(
        delivered + queued.len(),
        QUEUED,
        "every message is delivered or still queued"
    );
    assert!(
        delivered <= 6,
        "{delivered} of {QUEUED} delivered after SIGTERM: the backlog was not left queued"
    );
    assert!(ids.iter().filter(|id| queued.contains(*id)).count() >= QUEUED - 6);
}

#[test]
fn lmtp_delivery_uses_per_recipient_replies() {
    let dovecot = Dovecot::start();
    let sender_sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!(
        "[delivery]\nretry_schedule = [\"1s\"]\n\n\
         [[route]]\ndomains = [\"mailbox.test\"]\nnext_hop = \"127.0.0.1:{}\"\nprotocol = \"lmtp\"\ntls = \"none\"\n\n\
         [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\n",
        dovecot.port, sender_sink.addr
    ));
    let data = message("lmtp");
    // alice and bob take it; carol refuses after the data (quota); dave is unknown (RCPT).
    submit(
        &relay,
        &[
            "alice@mailbox.test",
            "carol@mailbox.test",
            "bob@mailbox.test",
            "dave@mailbox.test",
        ],
        &data,
    );
    let dsn = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(30));
    let report = parse_dsn(&dsn);
    let failed = reported_recipients(&report);
    assert_eq!(
        failed,
        vec!["rfc822; carol@mailbox.test", "rfc822; dave@mailbox.test"],
        "{report}"
    );
    for user in ["alice", "bob"] {
        let inbox = dovecot.inbox(user);
        assert_eq!(
            inbox.len(),
            1,
            "{user} got {} messages; log:\n{}",
            inbox.len(),
            relay.log()
        );
        // Dovecot stores with LF line ends and adds Return-Path/Delivered-To.
        let stored = String::from_utf8_lossy(&inbox[0]).replace('\n', "\r\n");
        let sent = String::from_utf8_lossy(&data).into_owned();
        assert!(stored.ends_with(&sent), "{user}'s copy differs:\n{stored}");
    }
    assert!(dovecot.inbox("carol").is_empty());
    // Dovecot offers CHUNKING: the content went as BDAT straight from the spool file.
    assert!(relay.log().contains("via BDAT"), "{}", relay.log());
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
}

#[test]
fn smtputf8_message_to_a_next_hop_without_smtputf8_bounces() {
    // Postfix's smtp-sink offers no SMTPUTF8; the sender's domain goes to aiosmtpd.
    let port = free_port();
    let mut smtp_sink = Command::new(require_tool("smtp-sink"))
        .args(["-u", "root", &format!("127.0.0.1:{port}"), "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sender_sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!(
        "[[route]]\ndomains = [\"dest.test\"]\nnext_hop = \"127.0.0.1:{port}\"\n\n\
         [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\n",
        sender_sink.addr
    ));
    let mut smtp = relay.connect();
    smtp.ehlo();
    smtp.expect(&format!("MAIL FROM:<{SENDER}> SMTPUTF8"), 250);
    smtp.expect("RCPT TO:<δοκιμή@dest.test>", 250);
    smtp.expect("DATA", 354);
    smtp.send(&crlf("Subject: ünïcödé\n\nbody\n.\n"));
    assert_eq!(smtp.reply().code, 250);
    let dsn = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(20));
    let _ = smtp_sink.kill();
    let _ = smtp_sink.wait();
    let report = parse_dsn(&dsn);
    assert_eq!(report["recipients"][0]["Status"], "5.6.7", "{report}");
    assert_eq!(report["status_type"], "message/global-delivery-status");
    assert_eq!(
        report["recipients"][0]["Final-Recipient"],
        "utf-8; δοκιμή@dest.test"
    );
    assert_eq!(report["returned"], "message/global");
    assert!(report["recipients"][0]["Diagnostic-Code"]
        .as_str()
        .unwrap()
        .contains("SMTPUTF8"));
}

#[test]
fn delay_warning_is_sent_once_and_delivery_continues() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let sender_sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!(
        "[delivery]\nretry_schedule = [\"1s\"]\ndelay_warning = \"2s\"\n\n\
         [[route]]\ndomains = [\"dest.test\"]\nnext_hop = \"{addr}\"\n\n\
         [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\n",
        sender_sink.addr
    ));
    submit(&relay, &["rcpt@dest.test"], &message("delay"));
    let warning = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(20));
    let report = parse_dsn(&warning);
    assert_eq!(report["recipients"][0]["Action"], "delayed", "{report}");
    assert_eq!(report["returned"], "message/rfc822");
    // The message is still queued, and it is delivered once the next hop is up.
    let sink = Sink::start(addr, &[]);
    sink.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sender_sink.messages_for(SENDER).len(),
        1,
        "one warning only"
    );
}

#[test]
fn delivered_recipients_are_not_sent_again_after_a_restart() {
    // good is taken at once; later is deferred for several attempts.
    let sink = Sink::loopback(&["--defer", "^later@", "--defer-times", "3"]);
    let mut relay = delivering_relay(&format!(
        "[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
        sink.addr
    ));
    let id = submit(
        &relay,
        &["good@dest.test", "later@dest.test"],
        &message("restart"),
    );
    sink.wait_for_rcpt("good@dest.test", Duration::from_secs(20));
    // The outcome is on disk before the next step.
    let state = wait_for(Duration::from_secs(10), || {
        let state = queue_show(&relay, &id)?;
        (state["recipients"][0]["status"] == "delivered").then_some(state)
    })
    .unwrap_or_else(|| panic!("state not persisted; log:\n{}", relay.log()));
    assert_eq!(state["recipients"][1]["status"], "pending");
    relay.kill9();
    relay.restart();
    sink.wait_for_rcpt("later@dest.test", Duration::from_secs(30));
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    assert_eq!(
        sink.messages_for("good@dest.test").len(),
        1,
        "good was delivered again after the restart"
    );
}

#[test]
fn several_messages_share_one_connection() {
    let sink = Sink::loopback(&[]);
    let relay = delivering_relay(&format!(
        "[delivery]\nrelayhost = \"{}\"\nmax_per_destination = 1\nidle_connection_timeout = \"10s\"\n",
        sink.addr
    ));
    for n in 0..4 {
        submit(
            &relay,
            &[&format!("r{n}@dest.test")],
            &message(&format!("reuse-{n}")),
        );
    }
    for n in 0..4 {
        sink.wait_for_rcpt(&format!("r{n}@dest.test"), Duration::from_secs(20));
    }
    let connections = fs::read_to_string(sink.dir.join("connections")).unwrap_or_default();
    let count: usize = connections.trim().parse().unwrap_or(0);
    assert!(
        (1..4).contains(&count),
        "{count} connections for 4 messages: no reuse"
    );
}
