//! Faults against the real `postern` binary: SMTP smuggling over raw TCP,
//! kill -9 after the 250 and during DATA, a real S3 server (moto) that goes
//! away, a spool disk (a small tmpfs) that fills up, and a real etcd that
//! stops answering. The invariant under test: a message that got a 250 is
//! never lost, and nothing else is kept; a fault that stops delivery shows in
//! `/stats` and `/metrics`.

mod common;
#[path = "common/etcd.rs"]
mod etcd_server;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn message(subject: &str, body_lines: usize) -> Vec<u8> {
    let mut data = crlf(&format!(
        "From: Sender <sender@example.org>\nTo: Rcpt <rcpt@example.net>\nSubject: {subject}\n\n"
    ));
    for i in 0..body_lines {
        data.extend_from_slice(
            format!("{subject} line {i:06} .......................................\r\n").as_bytes(),
        );
    }
    data.extend_from_slice(b".leading dot\r\nend\r\n");
    data
}

/// Sends one message on a fresh connection; returns the end-of-transaction reply.
fn send(relay: &Relay, data: &[u8]) -> Reply {
    let mut smtp = relay.connect();
    smtp.ehlo();
    let reply = smtp.send_mail("<sender@example.org>", &["<rcpt@example.net>"], data);
    smtp.send(b"QUIT\r\n");
    let _ = smtp.try_reply();
    reply
}

/// Files in the spool and the local object store that belong to no committed
/// message: spool files named after another id, and segments holding none
/// of the committed messages. Segments are released in the background
/// after a restart, so this waits a few seconds for them to go.
fn strays(relay: &Relay) -> Vec<String> {
    let find = || {
        let committed = relay.committed();
        let mut out = Vec::new();
        for file in files_under(&relay.spool_dir()) {
            let name = Path::new(&file)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            // `.lock` guards the spool against a second relay on the same directory.
            if name != ".lock" && !committed.iter().any(|id| name.starts_with(id.as_str())) {
                out.push(relay.spool_dir().join(file).display().to_string());
            }
        }
        for file in files_under(&relay.objects_dir()) {
            let path = relay.objects_dir().join(&file);
            let live = file.ends_with(".seg")
                && std::fs::read(&path).is_ok_and(|object| {
                    segment_messages(&object)
                        .iter()
                        .any(|(id, _, _)| committed.contains(id))
                });
            if !live {
                out.push(path.display().to_string());
            }
        }
        out
    };
    wait_for(Duration::from_secs(5), || {
        let found = find();
        found.is_empty().then_some(found)
    })
    .unwrap_or_else(find)
}

/// The object copy of message `id` (data) in the local-directory object
/// store's segments.
fn object_copy(relay: &Relay, id: &str) -> Option<Vec<u8>> {
    files_under(&relay.objects_dir())
        .iter()
        .filter(|file| file.ends_with(".seg"))
        .filter_map(|file| std::fs::read(relay.objects_dir().join(file)).ok())
        .flat_map(|object| segment_messages(&object))
        .find(|(held, _, _)| held == id)
        .map(|(_, _, data)| data)
}

// ---------------------------------------------------------------- smuggling

/// Each vector is what an attacker puts where a lenient server would see the
/// end of the data; a second transaction follows it. Postern must never
/// commit that second message (CVE-2023-51764/51765/51766).
const SMUGGLING_VECTORS: &[&[u8]] = &[
    b"\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\x00\n.\r\n",
    b"\r\n.\r\x00\n",
    b"\x00\n.\n",
    b"\n.\n\x00",
];

fn smuggle(relay: &Relay, vector: &[u8]) -> (Vec<Reply>, BTreeSet<String>) {
    let before = relay.committed();
    let mut smtp = relay.connect();
    smtp.ehlo();
    smtp.expect("MAIL FROM:<sender@example.org>", 250);
    smtp.expect("RCPT TO:<rcpt@example.net>", 250);
    smtp.expect("DATA", 354);
    let mut payload = crlf("From: sender@example.org\nSubject: carrier\n\ncarrier body");
    payload.extend_from_slice(vector);
    payload.extend_from_slice(&crlf(
        "MAIL FROM:<smuggler@evil.example>\nRCPT TO:<victim@example.com>\nDATA\n\
         From: smuggler@evil.example\nSubject: smuggled\n\nsmuggled body\n.\n",
    ));
    // The relay may refuse and hang up before it has read everything.
    let _ = smtp.try_send(&payload);
    // A safe relay answers once, at the real end of the data; a vulnerable one
    // also answers the smuggled commands.
    let mut replies = Vec::new();
    if let Ok(Some(reply)) = smtp.try_reply() {
        replies.push(reply);
        replies.extend(smtp.drain_replies(Duration::from_secs(1)));
    }
    let after = relay.committed();
    (replies, after.difference(&before).cloned().collect())
}

#[test]
fn smuggling_vectors_never_commit_a_second_message() {
    let relay = Relay::start_default();
    let mut failures = Vec::new();
    for vector in SMUGGLING_VECTORS {
        let (replies, new) = smuggle(&relay, vector);
        let shown = String::from_utf8_lossy(vector).escape_debug().to_string();
        let replies_text: Vec<String> = replies.iter().map(ToString::to_string).collect();
        let queued = replies
            .iter()
            .filter(|r| r.text().contains("queued as"))
            .count();
        let smuggled = new.iter().any(|id| {
            let env = relay.env(id).to_string();
            env.contains("victim") || env.contains("smuggler")
        });
        if new.len() > 1 || queued > 1 || smuggled {
            failures.push(format!(
                "vector \"{shown}\": {} new committed messages {new:?}, replies {replies_text:?}",
                new.len()
            ));
        }
        // A message that was accepted holds the whole payload as one message.
        for id in &new {
            let eml = relay.eml(id);
            if !contains(&eml, b"smuggled body") {
                failures.push(format!(
                    "vector \"{shown}\": {id} was cut short at the smuggled dot"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "smuggling succeeded:\n{}",
        failures.join("\n")
    );

    // Control: with a genuine <CRLF>.<CRLF> the same bytes are two messages,
    // and the counting above sees both (no pipelining across the dot here).
    let before = relay.committed();
    let mut smtp = relay.connect();
    smtp.ehlo();
    let first = smtp.send_mail(
        "<sender@example.org>",
        &["<rcpt@example.net>"],
        &crlf("Subject: carrier\n\nbody\n"),
    );
    assert_eq!(first.code, 250, "{first}");
    let second = smtp.send_mail(
        "<smuggler@evil.example>",
        &["<victim@example.com>"],
        &crlf("Subject: x\n\nbody\n"),
    );
    assert_eq!(second.code, 250, "{second}");
    let new: Vec<_> = relay.committed().difference(&before).cloned().collect();
    assert_eq!(new.len(), 2, "control case: {new:?}");
    assert!(
        new.iter()
            .any(|id| relay.env(id).to_string().contains("victim")),
        "control case: {new:?}"
    );
}

// ---------------------------------------------------------------- kill -9

#[test]
fn kill9_right_after_250_loses_nothing() {
    let mut relay = Relay::start_default();
    let mut sent = Vec::new();
    let mut smtp = relay.connect();
    smtp.ehlo();
    for i in 0..5 {
        let data = message(&format!("kill9 after ack {i}"), 50 + i * 400);
        let reply = smtp.send_mail("<sender@example.org>", &["<rcpt@example.net>"], &data);
        assert_eq!(reply.code, 250, "message {i}: {reply}");
        sent.push((reply.queued_id(), data));
    }
    // No QUIT: the relay dies the moment the last 250 is read.
    relay.kill9();
    drop(smtp);
    relay.restart();
    let committed = relay.committed();
    for (id, data) in &sent {
        assert!(
            committed.contains(id),
            "{id} got a 250 but is gone after kill -9; have {committed:?}"
        );
        relay.assert_spooled(id, data);
        // The object-store copy (a local directory here) holds the same bytes.
        let copy = object_copy(&relay, id).unwrap_or_else(|| {
            panic!(
                "no object-store copy of {id} in {:?}",
                files_under(&relay.objects_dir())
            )
        });
        assert!(
            copy == relay.eml(id),
            "object-store copy of {id} differs from the spool copy"
        );
    }
    // Still accepting after the restart.
    assert_eq!(send(&relay, &message("after restart", 3)).code, 250);
}

#[test]
fn kill9_during_data_leaves_nothing_of_that_transaction() {
    let mut relay = Relay::start_default();
    let keep = message("committed before the crash", 10);
    let kept_id = send(&relay, &keep).queued_id();

    let mut smtp = relay.connect();
    smtp.ehlo();
    smtp.expect("MAIL FROM:<sender@example.org>", 250);
    smtp.expect("RCPT TO:<rcpt@example.net>", 250);
    smtp.expect("DATA", 354);
    let partial = message("cut off by kill -9", 20_000); // about 1.3 MB
    smtp.send(&dot_stuff(&partial));
    // Give the relay time to stream part of it to disk; no final dot.
    let baseline = files_under(&relay.data_dir).len();
    wait_for(Duration::from_secs(3), || {
        (files_under(&relay.data_dir).len() > baseline).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let during = files_under(&relay.data_dir);
    relay.kill9();
    drop(smtp);

    relay.restart();
    let committed = relay.committed();
    assert_eq!(
        committed,
        BTreeSet::from([kept_id.clone()]),
        "after the restart only the committed message may be there (files during DATA: {during:?})"
    );
    relay.assert_spooled(&kept_id, &keep);
    let strays = strays(&relay);
    assert!(
        strays.is_empty(),
        "leftovers of the killed transaction after restart: {strays:?}\n(files during DATA: {during:?})"
    );
}

// ---------------------------------------------------------------- S3 (moto)

const BUCKET: &str = "postern-e2e";

fn s3_relay(moto: &Moto, copies: Vec<&'static str>, required: usize) -> Relay {
    Relay::start(RelayConfig {
        copies,
        required,
        deadline: "3s",
        object_store: ObjectStore::S3 {
            endpoint: moto.endpoint(),
            bucket: BUCKET.into(),
        },
        ..RelayConfig::default()
    })
}

/// Segments in S3: messages accepted together share one object, and a
/// message that stays deferred is copied forward so the segment it shared
/// with finished messages goes; the bucket then holds little more than the
/// live message (the storage target: live bytes at least half of it).
#[test]
fn a_long_deferred_message_is_copied_forward_and_its_old_segment_goes() {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let sink = common::mail::Sink::loopback(&["--defer", "^stuck@", "--defer-times", "1000"]);
    let relay = Relay::start(RelayConfig {
        copies: vec!["local", "object_store"],
        required: 2,
        deadline: "5s",
        object_store: ObjectStore::S3 {
            endpoint: moto.endpoint(),
            bucket: BUCKET.into(),
        },
        spool_toml: "segment_window = \"300ms\"\nsegment_forward_after = \"2s\"\n".into(),
        extra_toml: format!(
            "[delivery]\nrelayhost = \"{}\"\nretry_schedule = [\"1s\"]\n",
            sink.addr
        ),
        ..RelayConfig::default()
    });
    // Twenty sessions at once, one message each; one to a recipient the
    // sink keeps deferring.
    let sessions: Vec<_> = (0..20)
        .map(|n| {
            let smtp_addr = relay.smtp;
            std::thread::spawn(move || {
                let rcpt = if n == 7 {
                    "<stuck@example.net>".to_owned()
                } else {
                    format!("<r{n}@example.net>")
                };
                let mut smtp = Smtp::connect(smtp_addr);
                smtp.ehlo();
                let data = format!(
                    "Subject: segment {n}\r\n\r\n{}",
                    "body line\r\n".repeat(200)
                );
                let reply =
                    smtp.send_mail("<sender@example.org>", &[rcpt.as_str()], data.as_bytes());
                assert_eq!(reply.code, 250, "{reply}");
                (n, reply.queued_id())
            })
        })
        .collect();
    let ids: Vec<(usize, String)> = sessions.into_iter().map(|t| t.join().unwrap()).collect();
    let stuck = ids.iter().find(|(n, _)| *n == 7).unwrap().1.clone();
    let segments = |moto: &Moto| -> Vec<(String, Vec<common::SegmentMessage>)> {
        moto.list(BUCKET)
            .into_iter()
            .filter(|k| k.ends_with(".seg"))
            .filter_map(|k| {
                let object = common::s3_get(moto.addr, BUCKET, &k)?;
                Some((k, common::segment_messages(&object)))
            })
            .collect()
    };
    // Counted from moto's request log: delivery may already have released
    // (and deleted) some segments by the time the bucket is listed.
    let segment_puts = moto
        .log()
        .lines()
        .filter(|l| l.contains("\"PUT /") && l.contains(".seg"))
        .count();
    assert!(
        (1..=4).contains(&segment_puts),
        "20 messages accepted together took {segment_puts} segment PUTs"
    );
    // The stuck message's segment stays until it is copied forward.
    let first = segments(&moto);
    assert!(
        first
            .iter()
            .any(|(_, m)| m.iter().any(|(id, _, _)| *id == stuck)),
        "no segment holds the stuck message {stuck}"
    );
    for n in (0..20).filter(|n| *n != 7) {
        sink.wait_for_rcpt(&format!("r{n}@example.net"), Duration::from_secs(30));
    }
    // The finished messages are released; the segment the stuck one shares
    // stays until the copy-forward moves it out, then it goes.
    let moved = wait_for(Duration::from_secs(30), || {
        let now = segments(&moto);
        let only_stuck = now.len() == 1
            && now[0].1.len() == 1
            && now[0].1[0].0 == stuck
            && !first.iter().any(|(k, _)| *k == now[0].0);
        only_stuck.then_some(now)
    });
    let Some(now) = moved else {
        panic!(
            "the bucket does not hold the stuck message alone in a new segment: {:?}\nrelay log:\n{}",
            segments(&moto)
                .iter()
                .map(|(k, m)| (k.clone(), m.iter().map(|x| x.0.clone()).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            relay.log()
        );
    };
    let (_, envelope, data) = &now[0].1[0];
    assert!(
        *data == relay.eml(&stuck),
        "the copied-forward data differs"
    );
    let live = (envelope.len() + data.len()) as f64;
    let total: usize = moto
        .list(BUCKET)
        .iter()
        .filter_map(|k| common::s3_get(moto.addr, BUCKET, k))
        .map(|o| o.len())
        .sum();
    eprintln!("bucket: {total} octets, live message {live} octets");
    assert!(
        live / total as f64 >= 0.5,
        "live bytes are {live} of the bucket's {total}"
    );
    assert!(relay.log().contains("copied long-queued messages forward"));
}

#[test]
fn s3_quorum_gets_both_copies_and_451_when_s3_is_down() {
    let mut moto = Moto::start();
    moto.create_bucket(BUCKET);
    let relay = s3_relay(&moto, vec!["local", "object_store"], 2);

    let data = message("local plus s3", 100);
    let reply = send(&relay, &data);
    assert_eq!(reply.code, 250, "{reply}\nmoto log:\n{}", moto.log());
    let id = reply.queued_id();
    relay.assert_spooled(&id, &data);
    let keys = moto.list(BUCKET);
    let held: Vec<common::SegmentMessage> = keys
        .iter()
        .filter(|k| k.ends_with(".seg"))
        .flat_map(|k| common::segment_messages(&moto.get(BUCKET, k)))
        .collect();
    let (_, envelope, data) = held
        .iter()
        .find(|(held_id, _, _)| *held_id == id)
        .unwrap_or_else(|| panic!("no segment in bucket {BUCKET} holds {id}: {keys:?}"));
    assert!(
        *data == relay.eml(&id),
        "S3 copy of {id}'s data differs from the spool copy"
    );
    assert!(
        String::from_utf8_lossy(envelope).contains(&id),
        "S3 copy of {id}'s envelope does not name it"
    );

    // S3 goes away: the quorum cannot be met, so 451 within the deadline and
    // nothing committed.
    moto.stop();
    let before = relay.committed();
    let mut smtp = relay.connect();
    smtp.ehlo();
    smtp.expect("MAIL FROM:<sender@example.org>", 250);
    smtp.expect("RCPT TO:<rcpt@example.net>", 250);
    smtp.expect("DATA", 354);
    smtp.send(&dot_stuff(&message("s3 is down", 100)));
    let start = Instant::now();
    smtp.send(b".\r\n");
    let reply = smtp.reply();
    let took = start.elapsed();
    assert_eq!(
        reply.code, 451,
        "with S3 down and 2 of 2 copies required: {reply}"
    );
    assert!(reply.text().contains("4.3.0"), "{reply}");
    assert!(
        took < Duration::from_secs(3 + 2),
        "451 took {took:?}, the deadline is 3 s"
    );
    assert_eq!(
        relay.committed(),
        before,
        "a message that got 451 was committed"
    );
    let strays = strays(&relay);
    assert!(
        strays.is_empty(),
        "the 451'd message left files behind: {strays:?}"
    );
    // The session goes on after a 451.
    smtp.expect("RSET", 250);
}

#[test]
fn s3_down_a_policy_needing_only_local_still_accepts() {
    let mut moto = Moto::start();
    moto.create_bucket(BUCKET);
    let one_of_two = s3_relay(&moto, vec!["local", "object_store"], 1);
    let local_only = s3_relay(&moto, vec!["local"], 1);
    moto.stop();
    for relay in [&one_of_two, &local_only] {
        let data = message("s3 down, local enough", 100);
        let start = Instant::now();
        let reply = send(relay, &data);
        assert_eq!(reply.code, 250, "{reply}");
        assert!(
            start.elapsed() < Duration::from_secs(3 + 2),
            "took {:?}",
            start.elapsed()
        );
        relay.assert_spooled(&reply.queued_id(), &data);
    }
}

// ---------------------------------------------------------------- full disk

/// A tmpfs mounted for the test; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("postern-tmpfs-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let (ok, output) = run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path));
        assert!(
            ok,
            "cannot mount a tmpfs (the full-disk test runs as root, as CI does): {output}"
        );
        Tmpfs { path, _dir: dir }
    }

    fn available(&self) -> u64 {
        let output = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

#[test]
fn full_spool_disk_gives_452_and_loses_nothing() {
    let disk = Tmpfs::mount("8m");
    let mut relay = Relay::start(RelayConfig {
        data_dir: Some(disk.path.join("data")),
        reserve_bytes: Some(512 * 1024),
        ..RelayConfig::default()
    });

    // About 256 KiB each, two copies each (spool and local object store).
    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..64 {
        let data = message(&format!("filling the disk {i}"), 3_900);
        let mut smtp = relay.connect();
        smtp.ehlo();
        let reply = smtp.send_mail("<sender@example.org>", &["<rcpt@example.net>"], &data);
        match reply.code {
            250 => accepted.push((reply.queued_id(), data)),
            452 => {
                refusal = Some(reply);
                break;
            }
            _ => panic!("message {i}: expected 250 or 452, got {reply}"),
        }
    }
    let refusal = refusal.unwrap_or_else(|| panic!("the 8 MiB disk never filled up"));
    assert!(refusal.text().contains("4.3.1"), "{refusal}");
    assert!(
        accepted.len() >= 3,
        "only {} messages fit before 452",
        accepted.len()
    );
    let strays_now = strays(&relay);
    assert!(
        strays_now.is_empty(),
        "the refused message left files: {strays_now:?}"
    );

    // A declared SIZE beyond the free space is refused before any data is sent.
    let too_big = disk.available() + 1024 * 1024;
    let mut smtp = relay.connect();
    smtp.ehlo();
    let reply = smtp.cmd(&format!("MAIL FROM:<sender@example.org> SIZE={too_big}"));
    assert_eq!(
        reply.code, 452,
        "MAIL FROM with SIZE={too_big} on a full disk: {reply}"
    );
    drop(smtp);

    relay.kill9();
    relay.restart();
    let committed = relay.committed();
    for (id, data) in &accepted {
        assert!(
            committed.contains(id),
            "{id} got a 250 but is gone; have {committed:?}"
        );
        relay.assert_spooled(id, data);
    }
    relay.kill9();
}

fn get_json(relay: &Relay, path: &str) -> serde_json::Value {
    let (status, body) = http_request(relay.http, "GET", path, &[], b"").unwrap();
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e})"))
}

fn metrics_text(relay: &Relay) -> String {
    let (status, body) = http_request(relay.http, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    String::from_utf8(body).unwrap()
}

/// Waits until `/stats` says `delivery` is `state`; returns the stats.
fn wait_delivery(relay: &Relay, state: &str, timeout: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(timeout, || {
        last = get_json(relay, "/stats");
        (last["delivery"] == state).then(|| last.clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "delivery not {state} within {timeout:?}; last /stats: {last}\nlog:\n{}",
            relay.log()
        )
    })
}

/// A one-relay cluster on a real etcd. etcd stops answering (SIGSTOP): the
/// relay keeps accepting and stays ready, and `/stats` and `/metrics` say
/// delivery is stalled because etcd is unreachable; etcd answers again
/// (SIGCONT): delivery runs again and the gauge drops to 0.
#[test]
fn etcd_unreachable_stalls_delivery_visibly_while_accepting_goes_on() {
    let etcd = etcd_server::EtcdServer::start();
    let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dead_hop = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay = Relay::start(RelayConfig {
        copies: vec!["local"],
        required: 1,
        extra_toml: format!(
            "[cluster]\nname = \"relay-status\"\netcd = [\"{}\"]\nprefix = \"/postern-status-test\"\n\
             lease_ttl = \"3s\"\npeer_listen = \"{peer}\"\nsecret = \"0123456789abcdef-status-test\"\n\n\
             [[route]]\ndomains = [\"example.net\"]\nnext_hop = \"{dead_hop}\"\n",
            etcd.client_url
        ),
        ..RelayConfig::default()
    });
    let stats = wait_delivery(&relay, "running", Duration::from_secs(15));
    assert!(stats.get("delivery_reason").is_none(), "{stats}");
    assert!(
        metrics_text(&relay).contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 0\n")
    );

    etcd.signal(libc::SIGSTOP);
    // Renewals time out; safety ends a margin before the 3 s lease could expire.
    let stats = wait_delivery(&relay, "stalled", Duration::from_secs(10));
    eprintln!("etcd stopped: /stats {stats}");
    assert_eq!(stats["delivery_reason"], "etcd_unreachable", "{stats}");
    let why = stats["delivery_message"].as_str().unwrap();
    assert!(
        why.starts_with("etcd unreachable: ") && why.contains("renew"),
        "{why}"
    );
    assert_eq!(stats["ready"], true, "{stats}");
    let (readyz, _) = http_request(relay.http, "GET", "/readyz", &[], b"").unwrap();
    assert_eq!(readyz, 200, "a relay without etcd stays ready for SMTP");
    let reply = send(&relay, &message("accepted while etcd is stopped", 3));
    assert_eq!(reply.code, 250, "{reply}");
    let metrics = metrics_text(&relay);
    assert!(
        metrics.contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("postern_delivery_stalled{reason=\"lease_expired\"} 0\n"),
        "{metrics}"
    );
    // Still stalled a lease TTL later (nothing recovers by itself).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get_json(&relay, "/stats")["delivery"], "stalled");

    etcd.signal(libc::SIGCONT);
    let stats = wait_delivery(&relay, "running", Duration::from_secs(20));
    assert!(stats.get("delivery_message").is_none(), "{stats}");
    assert_eq!(
        stats["queue_depth"], 1,
        "the message accepted meanwhile is queued: {stats}"
    );
    assert!(
        metrics_text(&relay).contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 0\n")
    );
}
