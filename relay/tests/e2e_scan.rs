//! T-shaped content scanning end to end: the real binary asks a real
//! rspamd (Debian's, started by e2e/rspamd-start) about each message after it
//! is spooled and before the reply — by file path when co-located, else with
//! the body — and an SMTP endpoint (the aiosmtpd sink) as a scanner.

mod common;

use std::time::Duration;

use common::mail::*;
use common::rspamd::{CountingProxy, Rspamd};
use common::*;

const SENDER: &str = "sender@origin.test";
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// A relay scanning with `scanner_toml` (one `[[scanner]]` named "scan"),
/// delivering everything to `hop` (delivery paused when `hop` is none).
fn scanning_relay(scanner_toml: &str, hop: Option<&Sink>) -> Relay {
    let delivery = match hop {
        Some(hop) => format!(
            "[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
            hop.addr
        ),
        None => "[delivery]\npaused = true\n".into(),
    };
    Relay::start(RelayConfig {
        listener_toml: "scanners = [\"scan\"]\n".into(),
        extra_toml: format!("{delivery}\n[[scanner]]\nname = \"scan\"\n{scanner_toml}"),
        ..RelayConfig::default()
    })
}

fn rspamd_toml(addr: std::net::SocketAddr, pass_file: bool) -> String {
    format!("kind = \"rspamd\"\naddress = \"{addr}\"\npass_file = {pass_file}\ntimeout = \"10s\"\n")
}

fn message(subject: &str, body: &str) -> Vec<u8> {
    crlf(&format!(
        "From: <{SENDER}>\nTo: <rcpt@dest.test>\nSubject: {subject}\nMessage-ID: <{subject}@origin.test>\n\n{body}\n"
    ))
}

fn send(relay: &Relay, data: &[u8]) -> Reply {
    let mut smtp = relay.connect();
    smtp.ehlo();
    smtp.send_mail(&format!("<{SENDER}>"), &["<rcpt@dest.test>"], data)
}

/// Header lines of a message, unfolded, as (name, value).
fn headers(eml: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(eml);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push((name.to_owned(), value.trim().to_owned()));
        }
    }
    out
}

#[test]
fn gtube_is_refused_with_rspamds_5xx_and_nothing_is_kept() {
    let rspamd = Rspamd::start();
    let hop = Sink::loopback(&[]);
    let relay = scanning_relay(&rspamd_toml(rspamd.addr, true), Some(&hop));
    let reply = send(&relay, &message("gtube", GTUBE));
    assert_eq!(reply.code, 550, "{reply}");
    assert!(
        reply.text().contains("5.7.1") && reply.text().contains("Gtube pattern"),
        "{reply}"
    );
    assert!(relay.committed().is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert!(hop.messages().is_empty());
    assert_eq!(relay.counter("postern_scan_rejected_total"), 1);
    // The same session goes on: a clean message passes.
    let reply = send(&relay, &message("clean-after-gtube", "Hello."));
    assert_eq!(reply.code, 250, "{reply}");
}

#[test]
fn a_clean_message_reaches_the_next_hop_with_rspamds_headers_and_the_eml_is_unchanged() {
    let rspamd = Rspamd::start();
    // The hop defers the first attempt so the spooled files can be looked at.
    let hop = Sink::loopback(&["--defer", "rcpt@", "--defer-times", "1"]);
    let relay = scanning_relay(&rspamd_toml(rspamd.addr, true), Some(&hop));
    let data = message("clean", "A perfectly ordinary message.");
    let reply = send(&relay, &data);
    assert_eq!(reply.code, 250, "{reply}");
    let id = reply.queued_id();
    let spooled = relay.eml(&id);
    assert_eq!(
        strip_received(&spooled),
        &data[..],
        "the .eml is what the client sent"
    );
    assert!(!contains(&spooled, b"X-Spamd-Result"));
    let added = relay.env(&id)["added_headers"].as_str().unwrap().to_owned();
    assert!(
        added.contains("X-Spamd-Result: default: False [0.00 / 15.00]"),
        "{added}"
    );
    assert!(
        added.contains(&format!("X-Rspamd-Queue-Id: {id}")),
        "{added}"
    );
    let delivered = hop.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    // At the next hop: rspamd's headers on top, then our .eml byte for byte.
    assert_eq!(&delivered[..added.len()], added.as_bytes());
    assert_eq!(&delivered[added.len()..], &spooled[..]);
    let fields = headers(&delivered);
    assert!(
        fields
            .iter()
            .any(|(n, v)| n == "X-Spam-Status" && v == "No, score=0.00"),
        "{fields:?}"
    );
    assert!(fields
        .iter()
        .any(|(n, v)| n == "X-Rspamd-Action" && v == "no action"));
    assert!(!fields.iter().any(|(n, _)| n == "X-Spam"));
}

#[test]
fn co_located_rspamd_reads_the_spool_file_and_gets_no_body_over_the_socket() {
    let rspamd = Rspamd::start();
    let by_path = CountingProxy::start(rspamd.addr);
    let relay = scanning_relay(&rspamd_toml(by_path.addr, true), None);
    // 200 KiB of body: it either crosses the socket or it does not.
    let body = "This line is part of a large body that rspamd reads from disk.\n".repeat(3300);
    let data = message("by-path", &body);
    assert!(data.len() > 200_000);
    // (GTUBE is only looked for in small parts; the marker rule reads it all.)
    let reply = send(
        &relay,
        &message("by-path-reject", &format!("{body}POSTERN-TEST-REJECT\n")),
    );
    assert_eq!(reply.code, 550, "rspamd saw the content: {reply}");
    let reply = send(&relay, &data);
    assert_eq!(reply.code, 250, "{reply}");
    let sent_by_path = by_path.sent();
    assert!(
        sent_by_path < 4096,
        "{sent_by_path} octets went to rspamd for two 200 KiB messages"
    );
    assert!(
        rspamd.log().contains("loaded message from file"),
        "{}",
        rspamd.log()
    );

    // The same through a relay that is not co-located: the body goes over.
    let by_body = CountingProxy::start(rspamd.addr);
    let remote = scanning_relay(&rspamd_toml(by_body.addr, false), None);
    let reply = send(&remote, &data);
    assert_eq!(reply.code, 250, "{reply}");
    assert!(
        by_body.sent() > data.len() as u64,
        "{} octets",
        by_body.sent()
    );
}

#[test]
fn rspamd_actions_soft_reject_and_add_header() {
    let rspamd = Rspamd::start();
    let hop = Sink::loopback(&[]);
    let relay = scanning_relay(&rspamd_toml(rspamd.addr, true), Some(&hop));
    let reply = send(&relay, &message("soft", "POSTERN-TEST-SOFT-REJECT"));
    assert_eq!(reply.code, 451, "{reply}");
    assert!(
        reply.text().contains("Try again later (postern test)"),
        "{reply}"
    );
    let reply = send(&relay, &message("marked", "POSTERN-TEST-ADD-HEADER"));
    assert_eq!(reply.code, 250, "{reply}");
    let delivered = hop.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(20));
    let fields = headers(&delivered);
    assert!(
        fields.iter().any(|(n, v)| n == "X-Spam" && v == "Yes"),
        "{fields:?}"
    );
    assert!(fields
        .iter()
        .any(|(n, v)| n == "X-Spam-Status" && v == "Yes, score=7.00"));
    assert_eq!(relay.counter("postern_scan_tempfailed_total"), 1);
}

#[test]
fn a_scanner_that_is_down_tempfails_or_is_skipped_as_configured() {
    let dead = format!("127.0.0.1:{}", free_port());
    let strict = scanning_relay(
        &format!("kind = \"rspamd\"\naddress = \"{dead}\"\non_failure = \"tempfail\"\n"),
        None,
    );
    let reply = send(&strict, &message("down", "hello"));
    assert_eq!(reply.code, 451, "{reply}");
    assert!(reply.text().contains("4.7.1"), "{reply}");
    assert!(strict.committed().is_empty());
    assert_eq!(strict.counter("postern_scan_failures_total"), 1);

    let lenient = scanning_relay(
        &format!("kind = \"rspamd\"\naddress = \"{dead}\"\non_failure = \"accept\"\n"),
        None,
    );
    let reply = send(&lenient, &message("down-accept", "hello"));
    assert_eq!(reply.code, 250, "{reply}");
    assert_eq!(lenient.committed().len(), 1);
    assert_eq!(lenient.counter("postern_scan_failures_total"), 1);
}

#[test]
fn an_smtp_endpoint_scanner_refuses_a_message_and_passes_another() {
    // The scanner is an SMTP server that refuses content with the marker.
    let scanner = Sink::loopback(&["--refuse-content", "EICAR-LIKE-MARKER"]);
    let relay = scanning_relay(
        &format!(
            "kind = \"smtp\"\naddress = \"{}\"\ntimeout = \"5s\"\n",
            scanner.addr
        ),
        None,
    );
    let reply = send(&relay, &message("infected", "EICAR-LIKE-MARKER"));
    assert_eq!(reply.code, 554, "{reply}");
    assert!(
        reply
            .text()
            .contains("Message content refused by the scanner"),
        "{reply}"
    );
    assert!(relay.committed().is_empty());
    let data = message("clean-smtp", "nothing to see");
    let reply = send(&relay, &data);
    assert_eq!(reply.code, 250, "{reply}");
    // The scanner read the spooled message (our trace header included).
    let scanned = scanner.wait_for_rcpt("rcpt@dest.test", Duration::from_secs(5));
    assert_eq!(scanned, relay.eml(&reply.queued_id()));

    // A scanner slower than its timeout: tempfail.
    let slow = Sink::loopback(&["--data-delay", "30"]);
    let relay = scanning_relay(
        &format!(
            "kind = \"smtp\"\naddress = \"{}\"\ntimeout = \"1s\"\n",
            slow.addr
        ),
        None,
    );
    let reply = send(&relay, &message("slow", "hello"));
    assert_eq!(reply.code, 451, "{reply}");
}

#[test]
fn scanner_headers_go_out_with_bdat_too() {
    // Dovecot's LMTP offers CHUNKING: the added headers and the spool file
    // go out in one BDAT chunk (sendfile for the file part).
    let rspamd = Rspamd::start();
    let dovecot = Dovecot::start();
    let relay = Relay::start(RelayConfig {
        listener_toml: "scanners = [\"scan\"]\n".into(),
        extra_toml: format!(
            "[delivery]\nretry_schedule = [\"1s\"]\n\n\
             [[route]]\ndomains = [\"mailbox.test\"]\nnext_hop = \"127.0.0.1:{}\"\nprotocol = \"lmtp\"\ntls = \"none\"\n\n\
             [[scanner]]\nname = \"scan\"\n{}",
            dovecot.port,
            rspamd_toml(rspamd.addr, true)
        ),
        ..RelayConfig::default()
    });
    let data = message("bdat", "Through LMTP with BDAT.");
    let mut smtp = relay.connect();
    smtp.ehlo();
    let reply = smtp.send_mail(&format!("<{SENDER}>"), &["<alice@mailbox.test>"], &data);
    assert_eq!(reply.code, 250, "{reply}");
    let stored = wait_for(Duration::from_secs(20), || {
        dovecot.inbox("alice").into_iter().next()
    })
    .unwrap_or_else(|| panic!("nothing in alice's inbox; log:\n{}", relay.log()));
    assert!(relay.log().contains("via BDAT"), "{}", relay.log());
    // Dovecot stores LF line ends and adds Return-Path/Delivered-To on top.
    let stored = String::from_utf8_lossy(&stored).replace('\n', "\r\n");
    let spamd = stored
        .find("X-Spamd-Result:")
        .expect("rspamd's header arrived");
    let received = stored.find("(Postern)").expect("our trace header");
    assert!(spamd < received, "added headers come first:\n{stored}");
    assert!(stored.ends_with(&String::from_utf8_lossy(&data).into_owned()));
}
