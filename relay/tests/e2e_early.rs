//! Early delivery end to end: the real binary tries the next hop during the
//! end of data and passes its verdict to the sending client — an aiosmtpd
//! sink that accepts, refuses (550), defers (451) or hangs past the budget,
//! and Dovecot's LMTP server answering per recipient.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::mail::*;
use common::*;

const SENDER: &str = "sender@origin.test";

/// A relay whose `dest.test` route (to `hop`) delivers early with `budget`,
/// and whose `origin.test` (the sender's domain, where DSNs go) goes to
/// `sender_sink`.
fn early_relay(hop: &str, budget: &str, sender_sink: &Sink, extra: &str) -> Relay {
    Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nretry_schedule = [\"1s\"]\n\n\
             [[route]]\ndomains = [\"dest.test\"]\nnext_hop = \"{hop}\"\ntls = \"none\"\n\
             early_delivery = true\nearly_budget = \"{budget}\"\n\n\
             [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\ntls = \"none\"\n\n{extra}",
            sender_sink.addr
        ),
        ..RelayConfig::default()
    })
}

fn message(subject: &str) -> Vec<u8> {
    crlf(&format!(
        "From: <{SENDER}>\nTo: <rcpt@dest.test>\nSubject: {subject}\nMessage-ID: <{subject}@origin.test>\n\n\
         Early delivery test body.\n.A line that starts with a dot\n"
    ))
}

fn send(relay: &Relay, rcpts: &[&str], data: &[u8]) -> Reply {
    let mut smtp = relay.connect();
    smtp.ehlo();
    let rcpts: Vec<String> = rcpts.iter().map(|r| format!("<{r}>")).collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    smtp.send_mail(&format!("<{SENDER}>"), &rcpts, data)
}

/// Message files under `dir` (the spool's lock file is not a message).
fn messages_in(dir: &std::path::Path) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|f| f.ends_with(".msg"))
        .collect()
}

fn assert_no_dsn(sender_sink: &Sink, relay: &Relay) {
    // The queue would have sent a DSN at once; give it time to show up.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        sender_sink.messages_for(SENDER).is_empty(),
        "a DSN was sent to the sender; log:\n{}",
        relay.log()
    );
    assert!(!relay
        .log()
        .contains("queued a delivery status notification"));
}

#[test]
fn accepted_by_the_next_hop_before_our_reply_and_never_queued() {
    let hop = Sink::loopback(&[]);
    let sender_sink = Sink::loopback(&[]);
    let relay = early_relay(&hop.addr.to_string(), "10s", &sender_sink, "");
    let data = message("early-accept");
    let reply = send(&relay, &["rcpt@dest.test"], &data);
    assert_eq!(reply.code, 250, "{reply}");
    assert!(reply.text().contains("delivered early"), "{reply}");
    assert!(
        reply.text().contains("SINK1"),
        "the next hop's reply is passed on: {reply}"
    );
    // Already at the next hop when the client hears 250: no waiting here.
    let copies = hop.messages_for("rcpt@dest.test");
    assert_eq!(copies.len(), 1);
    assert_eq!(strip_received(&copies[0]), &data[..]);
    // Nothing was queued or left behind.
    assert!(relay.committed().is_empty());
    assert!(
        messages_in(&relay.spool_dir()).is_empty(),
        "{:?}",
        messages_in(&relay.spool_dir())
    );
    assert!(messages_in(&relay.objects_dir()).is_empty());
    assert_eq!(relay.counter("postern_recipients_delivered_early_total"), 1);
    assert_eq!(relay.counter("postern_messages_accepted_total"), 0);
    assert!(relay.log().contains("delivered early"), "{}", relay.log());
}

#[test]
fn refused_by_the_next_hop_the_sender_sees_its_550_and_no_dsn_is_made() {
    let hop = Sink::loopback(&["--reject", "nobody@"]);
    let sender_sink = Sink::loopback(&[]);
    let relay = early_relay(&hop.addr.to_string(), "10s", &sender_sink, "");
    let reply = send(&relay, &["nobody@dest.test"], &message("early-refuse"));
    assert_eq!(reply.code, 550, "{reply}");
    assert!(
        reply.text().contains("5.1.1") && reply.text().contains("no such user"),
        "the next hop's own reply: {reply}"
    );
    assert!(hop.messages().is_empty());
    assert!(relay.committed().is_empty());
    assert_no_dsn(&sender_sink, &relay);
    assert!(messages_in(&relay.spool_dir()).is_empty());
}

#[test]
fn deferred_by_the_next_hop_the_message_is_queued_and_delivered_later() {
    let hop = Sink::loopback(&["--defer", "later@", "--defer-times", "1"]);
    let sender_sink = Sink::loopback(&[]);
    let relay = early_relay(&hop.addr.to_string(), "10s", &sender_sink, "");
    let data = message("early-defer");
    let reply = send(&relay, &["later@dest.test"], &data);
    assert_eq!(reply.code, 250, "{reply}");
    let id = reply.queued_id();
    assert!(hop.messages().is_empty(), "the 451 took nothing");
    assert_eq!(relay.counter("postern_early_delivery_deferred_total"), 1);
    let delivered = hop.wait_for_rcpt("later@dest.test", Duration::from_secs(20));
    assert_eq!(strip_received(&delivered), &data[..]);
    assert!(relay.log().contains(&id));
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    assert_no_dsn(&sender_sink, &relay);
}

#[test]
fn a_next_hop_hanging_past_the_budget_gets_the_message_through_the_queue() {
    let work = tempfile::tempdir().unwrap();
    let delay_file = work.path().join("delay");
    // The next hop sits on the end of data for a minute; the budget is 2 s.
    fs::write(&delay_file, "60").unwrap();
    let hop = Sink::loopback(&["--delay-file", delay_file.to_str().unwrap()]);
    let sender_sink = Sink::loopback(&[]);
    let relay = early_relay(&hop.addr.to_string(), "2s", &sender_sink, "");
    let data = message("early-hang");
    let reply = send(&relay, &["slow@dest.test"], &data);
    // Queued (not "delivered early" after the hop's minute).
    assert_eq!(reply.code, 250, "{reply}");
    let id = reply.queued_id();
    assert!(relay.committed().contains(&id), "queued durably");
    assert!(
        relay.log().contains("early-delivery budget"),
        "{}",
        relay.log()
    );
    // The hop recovers; the queue delivers.
    fs::write(&delay_file, "0").unwrap();
    let delivered = hop.wait_for_rcpt("slow@dest.test", Duration::from_secs(30));
    assert_eq!(strip_received(&delivered), &data[..]);
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
}

#[test]
fn lmtp_per_recipient_answers_split_the_message() {
    let dovecot = Dovecot::start();
    // It defers zed once, so the queued message can be looked at.
    let queued_hop = Sink::loopback(&["--defer", "zed@", "--defer-times", "1"]);
    let sender_sink = Sink::loopback(&[]);
    // mailbox.test: Dovecot LMTP, early. queue.test: no early delivery.
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nretry_schedule = [\"1s\"]\n\n\
             [[route]]\ndomains = [\"mailbox.test\"]\nnext_hop = \"127.0.0.1:{}\"\nprotocol = \"lmtp\"\ntls = \"none\"\nearly_delivery = true\n\n\
             [[route]]\ndomains = [\"queue.test\"]\nnext_hop = \"{}\"\ntls = \"none\"\n\n\
             [[route]]\ndomains = [\"origin.test\"]\nnext_hop = \"{}\"\ntls = \"none\"\n",
            dovecot.port, queued_hop.addr, sender_sink.addr
        ),
        ..RelayConfig::default()
    });
    let data = message("early-lmtp");
    // alice and bob take it; carol refuses after the data (quota); dave is
    // unknown (RCPT); zed is on a route without early delivery.
    let reply = send(
        &relay,
        &[
            "alice@mailbox.test",
            "carol@mailbox.test",
            "zed@queue.test",
            "bob@mailbox.test",
            "dave@mailbox.test",
        ],
        &data,
    );
    assert_eq!(reply.code, 250, "{reply}");
    let id = reply.queued_id();
    // At the reply, alice and bob have it already.
    for user in ["alice", "bob"] {
        assert_eq!(
            dovecot.inbox(user).len(),
            1,
            "{user}; log:\n{}",
            relay.log()
        );
    }
    assert!(dovecot.inbox("carol").is_empty());
    // alice and bob are done; zed is queued to deliver, carol and dave are
    // kept (already failed) so the queue's one DSN reports them.
    let envelope = relay.env(&id);
    let queued: Vec<String> = envelope["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}@{}",
                r["address"]["local"].as_str().unwrap(),
                r["address"]["domain"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        queued,
        vec!["carol@mailbox.test", "zed@queue.test", "dave@mailbox.test"]
    );
    let shown = Command::new(postern_bin())
        .args(["queue", "show", &id, "--json", "--data-dir"])
        .arg(&relay.data_dir)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("552") && shown.contains("550"), "{shown}");
    queued_hop.wait_for_rcpt("zed@queue.test", Duration::from_secs(20));
    // carol and dave: one DSN, with LMTP's own per-recipient reasons.
    let dsn = sender_sink.wait_for_rcpt(SENDER, Duration::from_secs(20));
    let report = parse_dsn(&dsn);
    let failed = reported_recipients(&report);
    assert_eq!(
        failed,
        vec!["rfc822; carol@mailbox.test", "rfc822; dave@mailbox.test"],
        "{report}"
    );
    assert_eq!(relay.counter("postern_recipients_delivered_early_total"), 2);
    assert!(wait_for(Duration::from_secs(10), || queue_is_empty(&relay)
        .then_some(()))
    .is_some());
    // Dovecot got them exactly once each (no later queue delivery).
    for user in ["alice", "bob"] {
        assert_eq!(dovecot.inbox(user).len(), 1);
    }

    // Every LMTP recipient refused: the sender hears the refusal, no DSN.
    let before = sender_sink.messages_for(SENDER).len();
    let reply = send(
        &relay,
        &["carol@mailbox.test", "dave@mailbox.test"],
        &message("early-lmtp-refused"),
    );
    assert!(reply.code >= 500, "{reply}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sender_sink.messages_for(SENDER).len(),
        before,
        "no second DSN"
    );
}
