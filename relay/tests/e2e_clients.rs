//! Real SMTP clients deliver through the real `postern` binary: swaks, Python's
//! smtplib, a Postfix instance that uses Postern as its relayhost, and Exim's
//! smtp transport, which sends with BDAT when CHUNKING is offered. The spooled
//! `.eml` must be the sent message byte for byte after our `Received:` header.

mod common;

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

/// One test message: envelope, MAIL parameters and wire-format data.
struct Sample {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    mail_params: &'static [&'static str],
    data: Vec<u8>,
}

fn samples() -> Vec<Sample> {
    vec![
        Sample {
            name: "plain",
            from: "sender@example.org",
            to: "rcpt@example.net",
            mail_params: &[],
            data: crlf(
                "From: Sender <sender@example.org>\n\
                 To: Rcpt <rcpt@example.net>\n\
                 Subject: plain e2e message\n\
                 Message-ID: <plain@e2e.postern.test>\n\
                 \n\
                 Hello from the e2e suite.\n\
                 .a line that starts with a dot\n\
                 ..and one with two\n\
                 .\n\
                 \ttabbed, trailing space \n\
                 \n\
                 end\n",
            ),
        },
        Sample {
            name: "8bit",
            from: "sender@example.org",
            to: "rcpt@example.net",
            mail_params: &["BODY=8BITMIME"],
            data: {
                let mut data = crlf(
                    "From: Sender <sender@example.org>\n\
                     To: Rcpt <rcpt@example.net>\n\
                     Subject: 8bit e2e message\n\
                     MIME-Version: 1.0\n\
                     Content-Type: text/plain; charset=utf-8\n\
                     Content-Transfer-Encoding: 8bit\n\
                     \n\
                     Grüße, ça va? 日本語のテキスト\n",
                );
                // Latin-1 octets too: 8BITMIME does not promise UTF-8.
                data.extend_from_slice(b"caf\xe9 cr\xe8me br\xfbl\xe9e\r\nend\r\n");
                data
            },
        },
        Sample {
            name: "smtputf8",
            from: "jöran@exämple.org",
            to: "zoë@bücher.example",
            mail_params: &["SMTPUTF8", "BODY=8BITMIME"],
            data: crlf(
                "From: Jöran <jöran@exämple.org>\n\
                 To: Zoë <zoë@bücher.example>\n\
                 Subject: Grüße aus dem Test — SMTPUTF8\n\
                 MIME-Version: 1.0\n\
                 Content-Type: text/plain; charset=utf-8\n\
                 Content-Transfer-Encoding: 8bit\n\
                 \n\
                 Ünïcödé in headers and body: ✉ 📬\n\
                 end\n",
            ),
        },
    ]
}

#[test]
fn swaks_delivers_plain_8bit_and_smtputf8() {
    let swaks = require_tool("swaks");
    let relay = Relay::start_default();
    let work = tempfile::tempdir().unwrap();
    for sample in samples() {
        // swaks appends CRLF.CRLF to the data and sends no CRLF of its own when
        // the data lacks a final one, so the file holds the data minus its last CRLF.
        let file = write_file(
            work.path(),
            sample.name,
            sample.data.strip_suffix(b"\r\n").unwrap(),
        );
        // swaks (2020) has no option for MAIL parameters; it sends
        // `MAIL FROM:<$from>`, so the parameters ride in the address and the
        // trailing `<` becomes part of an ENVID (xtext allows `<` and `>`).
        let from = if sample.mail_params.is_empty() {
            sample.from.to_owned()
        } else {
            format!(
                "{}> {} ENVID=swaks<",
                sample.from,
                sample.mail_params.join(" ")
            )
        };
        let server = relay.smtp.to_string();
        let (ok, output) = run(Command::new(&swaks)
            .args([
                "--server",
                &server,
                "--helo",
                "swaks.test",
                "--from",
                &from,
                "--to",
                sample.to,
            ])
            .arg("--data")
            .arg(format!("@{}", file.display())));
        assert!(
            ok,
            "swaks failed for the {} message:\n{output}",
            sample.name
        );
        let id = queued_id(&output)
            .unwrap_or_else(|| panic!("no `queued as` in swaks output:\n{output}"));
        relay.assert_spooled(&id, &sample.data);
        let env = relay.env(&id).to_string();
        assert!(
            env.contains(sample.to.split('@').next().unwrap()),
            "{} .env: {env}",
            sample.name
        );
    }
}

const SMTPLIB_CLIENT: &str = r#"
import smtplib, sys
host, port, mail_from, rcpt, path = sys.argv[1:6]
options = sys.argv[6:]
msg = open(path, 'rb').read()
with smtplib.SMTP(host, int(port), local_hostname='python.test', timeout=60) as s:
    s.ehlo()
    code, resp = s.mail(mail_from, options)
    assert code == 250, ('MAIL', code, resp)
    code, resp = s.rcpt(rcpt)
    assert code == 250, ('RCPT', code, resp)
    code, resp = s.data(msg)
    print(code, resp.decode())
    assert code == 250, ('DATA', code, resp)
"#;

#[test]
fn python_smtplib_delivers_plain_8bit_and_smtputf8() {
    let python = require_tool("python3");
    let relay = Relay::start_default();
    let work = tempfile::tempdir().unwrap();
    for sample in samples() {
        let file = write_file(work.path(), sample.name, &sample.data);
        let (ok, output) = run(Command::new(&python)
            .args([
                "-c",
                SMTPLIB_CLIENT,
                "127.0.0.1",
                &relay.smtp.port().to_string(),
                sample.from,
                sample.to,
            ])
            .arg(&file)
            .args(sample.mail_params));
        assert!(
            ok,
            "smtplib failed for the {} message:\n{output}",
            sample.name
        );
        let id = queued_id(&output)
            .unwrap_or_else(|| panic!("no `queued as` in smtplib output:\n{output}"));
        relay.assert_spooled(&id, &sample.data);
    }
}

#[test]
fn postfix_relays_through_postern_as_its_relayhost() {
    let relay = Relay::start_default();
    let postfix = Postfix::start(&[format!("relayhost = [127.0.0.1]:{}", relay.smtp.port())]);

    let body = crlf(
        "From: Sender <sender@example.org>\n\
         To: Rcpt <rcpt@example.net>\n\
         Subject: relayed by postfix\n\
         Message-ID: <postfix-relay@e2e.postern.test>\n\
         \n\
         token postfix-relay-7d1c9a\n\
         .dot line\n",
    );
    let mut smtp = Smtp::connect(postfix.addr());
    smtp.ehlo();
    let reply = smtp.send_mail("<sender@example.org>", &["<rcpt@example.net>"], &body);
    assert_eq!(reply.code, 250, "postfix refused the message: {reply}");
    smtp.cmd("QUIT");

    // Postfix delivers from its queue; a refusal by postern shows in its log.
    let ids = wait_for(Duration::from_secs(60), || {
        let log = postfix.maillog();
        assert!(
            !log.contains("status=bounced") && !log.contains("status=deferred"),
            "postfix could not deliver to postern:\n{log}"
        );
        Some(relay.committed()).filter(|c| !c.is_empty())
    })
    .unwrap_or_else(|| {
        panic!(
            "nothing arrived from postfix in 60 s:\n{}",
            postfix.maillog()
        )
    });
    let id = ids.iter().next().unwrap();
    let eml = relay.eml(id);
    let rest = strip_received(&eml);
    // Postfix adds its own Received: header (and may add missing headers such
    // as Date:); our header lines and the body arrive unchanged.
    let text = String::from_utf8_lossy(rest);
    assert!(
        rest.starts_with(b"Received: "),
        "no Postfix Received: header:\n{text}"
    );
    let split = find(&body, b"\r\n\r\n").unwrap() + 2;
    assert!(
        rest.ends_with(&body[split..]),
        "body changed on the way:\n{text}"
    );
    for header in body[..split]
        .split(|&b| b == b'\n')
        .filter(|h| !h.is_empty())
    {
        assert!(
            contains(rest, header),
            "header {:?} lost:\n{text}",
            String::from_utf8_lossy(header)
        );
    }
    let env = relay.env(id).to_string();
    assert!(
        env.contains("sender") && env.contains("rcpt"),
        "envelope: {env}"
    );
    // The message is committed here a moment before Postfix hears 250 and logs it.
    let delivered_to = format!("relay=127.0.0.1[127.0.0.1]:{}", relay.smtp.port());
    let logged = wait_for(Duration::from_secs(10), || {
        let log = postfix.maillog();
        (log.contains(&delivered_to) && log.contains("status=sent")).then_some(log)
    });
    let log = logged.unwrap_or_else(|| {
        panic!(
            "postfix did not log the delivery to postern:\n{}",
            postfix.maillog()
        )
    });
    assert!(
        log.contains(&format!("queued as {id}")),
        "postfix log lacks postern's reply:\n{log}"
    );
}

/// The Exim binary that e2e/install-deps unpacked (Exim and Postfix conflict as packages).
fn exim_binary() -> PathBuf {
    let root = std::env::var_os("POSTERN_E2E_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/postern-e2e"), PathBuf::from);
    let exim = root.join("exim/usr/sbin/exim4");
    assert!(
        exim.is_file(),
        "{} not found: {INSTALL_HINT}",
        exim.display()
    );
    exim
}

#[test]
fn exim_sends_with_bdat_when_chunking_is_offered() {
    let exim = exim_binary();
    let relay = Relay::start_default();
    let work = tempfile::Builder::new()
        .prefix("exim-e2e-")
        .tempdir()
        .unwrap();
    // Exim insists on a root-owned config that nobody else can write, and runs
    // its deliveries as its compiled-in user, which must own spool and log.
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let uid = Command::new("id")
        .args(["-u", "Debian-exim"])
        .output()
        .unwrap();
    assert!(
        uid.status.success(),
        "user Debian-exim missing: {INSTALL_HINT}"
    );
    let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
    for dir in ["spool", "log"] {
        fs::create_dir(work.path().join(dir)).unwrap();
        chown(work.path().join(dir), Some(uid), None).unwrap();
    }
    let config = format!(
        "exim_path = {exim}\n\
         keep_environment =\n\
         primary_hostname = exim.postern.test\n\
         qualify_domain = postern.test\n\
         spool_directory = {dir}/spool\n\
         log_file_path = {dir}/log/%slog\n\
         log_selector = +all\n\
         begin routers\n\
         to_postern:\n  driver = manualroute\n  transport = postern_smtp\n  route_list = * 127.0.0.1::{port} byname\n  self = send\n\
         begin transports\n\
         postern_smtp:\n  driver = smtp\n  hosts_try_chunking = *\n  hosts_avoid_tls = *\n\
         begin retry\n\
         * * F,1m,1m\n",
        exim = exim.display(),
        dir = work.path().display(),
        port = relay.smtp.port(),
    );
    let config_path = write_file(work.path(), "exim.conf", config.as_bytes());
    fs::set_permissions(&config_path, fs::Permissions::from_mode(0o644)).unwrap();

    // Large enough that the body does not fit in one write.
    let mut message = crlf("From: sender@example.org\nTo: rcpt@example.net\nSubject: exim bdat\n\ntoken exim-bdat-31f0\n");
    for i in 0..2000 {
        message.extend_from_slice(
            format!("line {i:05} of a message that goes over BDAT in chunks\r\n").as_bytes(),
        );
    }
    message.extend_from_slice(b".a dot line that BDAT must not stuff\r\n");
    let message_path = write_file(work.path(), "message", &message);

    // -odf: deliver in the foreground; -d+transport logs the SMTP dialogue.
    let output = Command::new(&exim)
        .arg("-C")
        .arg(&config_path)
        .args([
            "-odf",
            "-i",
            "-d+transport",
            "-f",
            "sender@example.org",
            "rcpt@example.net",
        ])
        .stdin(fs::File::open(&message_path).unwrap())
        .output()
        .unwrap();
    let debug = String::from_utf8_lossy(&output.stderr);
    let mainlog = fs::read_to_string(work.path().join("log/mainlog")).unwrap_or_default();
    let context = || {
        format!(
            "exim mainlog:\n{mainlog}\nexim SMTP dialogue:\n{}",
            smtp_lines(&debug)
        )
    };
    assert!(
        output.status.success(),
        "exim failed ({}); {}",
        output.status,
        context()
    );
    assert!(
        mainlog.contains("Completed"),
        "exim did not complete the delivery; {}",
        context()
    );
    assert!(
        smtp_lines(&debug).contains("BDAT "),
        "exim did not use BDAT; {}",
        context()
    );

    let ids = relay.wait_committed(1, Duration::from_secs(10));
    let id = ids.iter().next().unwrap();
    let eml = relay.eml(id);
    let rest = strip_received(&eml);
    // Exim adds its Received:, Message-Id: and Date: headers; the body is ours.
    let body_start = find(&message, b"token exim-bdat").unwrap();
    assert!(
        rest.ends_with(&message[body_start..]),
        "body changed on the way:\n{}",
        String::from_utf8_lossy(&rest[..rest.len().min(2000)])
    );
    // The delivery line's K flag: Exim's own record that CHUNKING was used.
    assert!(
        mainlog
            .lines()
            .any(|l| l.contains(" => ") && l.contains(" K ")),
        "exim's delivery line lacks the K (CHUNKING) flag; {}",
        context()
    );
    assert!(
        mainlog.contains(&format!("queued as {id}")),
        "exim log lacks postern's reply; {}",
        context()
    );
}

fn smtp_lines(debug: &str) -> String {
    debug
        .lines()
        // `SMTP>>` is a command sent at once, `SMTP|>` one held for a pipelined
        // write, `SMTP+>` a BDAT written together with its chunk.
        .filter(|l| {
            ["SMTP>>", "SMTP|>", "SMTP+>", "SMTP<<"]
                .iter()
                .any(|p| l.contains(p))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
