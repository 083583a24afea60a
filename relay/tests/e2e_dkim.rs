//! DKIM signing checked by a real verifier: the relay signs its own users'
//! mail with an RSA-2048 and an Ed25519 key made by `openssl genpkey`,
//! delivers it to the aiosmtpd sink, and Debian's dkimpy (python3-dkim)
//! verifies every signature of the message as the sink received it, with
//! the public keys in TXT records served by dnsmasq. Mail from a domain
//! without a key, and mail from a client the relay does not trust, go out
//! unsigned. The tools come from `bash e2e/install-deps`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dns::Dns;
use common::mail::*;
use common::*;

/// `openssl genpkey` with `args`, to `path`; returns the public key's DER
/// (SubjectPublicKeyInfo).
fn genpkey(path: &Path, args: &[&str]) -> Vec<u8> {
    let status = Command::new(require_tool("openssl"))
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "openssl genpkey {args:?}");
    let public = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(path)
        .output()
        .unwrap();
    assert!(public.status.success());
    public.stdout
}

/// A dnsmasq TXT record: `name` with `text` split into character-strings.
fn txt_record(name: &str, text: &str) -> String {
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(200)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!("--txt-record={name},{}", strings.join(","))
}

/// dkimpy's verdict on every DKIM-Signature of `message`, keys from `dns`:
/// one `d= a= result` line each.
const VERIFY: &str = r#"
import sys, dkim, dns.resolver
port = int(sys.argv[1])
message = sys.stdin.buffer.read()
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = port
def txt(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    answer = resolver.resolve(name, "TXT", lifetime=timeout)
    return b"".join(answer[0].strings)
d = dkim.DKIM(message)
count = sum(1 for line in message.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
for i in range(count):
    try:
        ok = d.verify(idx=i, dnsfunc=txt)
    except dkim.ValidationError as e:
        print("dkimpy:", e, file=sys.stderr)
        ok = False
    print(d.domain.decode(), d.signature_fields[b"a"].decode(), "pass" if ok else "fail")
"#;

fn verify(message: &[u8], dns: &Dns) -> Vec<String> {
    use std::io::Write;
    // Debian's python3-dkim is installed for Debian's own interpreter.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", VERIFY, &dns.addr.port().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (bash e2e/install-deps installs python3-dkim)");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "dkimpy: {} (bash e2e/install-deps installs python3-dkim)",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn own_mail_is_signed_rsa_and_ed25519_and_dkimpy_verifies_it_as_received() {
    let keys = tempfile::tempdir().unwrap();
    let rsa = keys.path().join("rsa.pem");
    let ed25519 = keys.path().join("ed25519.pem");
    let rsa_public = genpkey(
        &rsa,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let ed_public = genpkey(&ed25519, &["-algorithm", "ed25519"]);
    // RFC 8463: an Ed25519 key is published as its 32 octets, not the SPKI.
    let ed_raw = &ed_public[ed_public.len() - 32..];
    let b64 = |bytes: &[u8]| {
        let output = Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(bytes)?;
                child.wait_with_output()
            })
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    };
    let dns = Dns::start(&[
        txt_record(
            "rsa2026._domainkey.example.org",
            &format!("v=DKIM1; k=rsa; p={}", b64(&rsa_public)),
        ),
        txt_record(
            "ed2026._domainkey.example.org",
            &format!("v=DKIM1; k=ed25519; p={}", b64(ed_raw)),
        ),
    ]);

    let sink = Sink::loopback(&[]);
    let relay = Relay::start(RelayConfig {
        extra_toml: format!(
            "[delivery]\nrelayhost = \"{}\"\n\n\
             [policy]\nrelay_domains = [\"dest.test\"]\ntrusted_networks = [\"127.0.0.1/32\"]\n\n\
             [[dkim]]\ndomain = \"example.org\"\nselector = \"rsa2026\"\nkey_file = \"{}\"\n\n\
             [[dkim]]\ndomain = \"example.org\"\nselector = \"ed2026\"\nkey_file = \"{}\"\n",
            sink.addr,
            rsa.display(),
            ed25519.display()
        ),
        ..RelayConfig::default()
    });
    let message = |from: &str, subject: &str| {
        crlf(&format!(
            "From: Alice <{from}>\nTo: <rcpt@dest.test>\nSubject: {subject}\n\
             Date: Mon, 7 Dec 2026 12:00:00 +0000\nMessage-ID: <{subject}@example.org>\n\n\
             Dear reader,\n.a line with a leading dot\n\nand  spaces   inside,  \n"
        ))
    };
    // Python's smtplib, from a chosen loopback address.
    let send = |source: &str, from: &str, rcpt: &str, subject: &str| {
        const SEND: &str = "import smtplib, sys\n\
            s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), source_address=(sys.argv[3], 0))\n\
            s.sendmail(sys.argv[4], [sys.argv[5]], sys.stdin.buffer.read())\n\
            s.quit()\n";
        use std::io::Write;
        let mut child = Command::new(require_tool("python3"))
            .args(["-c", SEND])
            .args([
                relay.smtp.ip().to_string(),
                relay.smtp.port().to_string(),
                source.to_owned(),
                from.to_owned(),
                rcpt.to_owned(),
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&message(from, subject))
            .unwrap();
        assert!(child.wait().unwrap().success(), "smtplib from {source}");
    };
    // A trusted client (our own), from a subdomain of the signing domain.
    send(
        "127.0.0.1",
        "alice@news.example.org",
        "signed@dest.test",
        "signed",
    );
    // A trusted client, but no key for example.net.
    send(
        "127.0.0.1",
        "bob@example.net",
        "unkeyed@dest.test",
        "unkeyed",
    );
    // Mail from outside for a relay domain: not ours to sign.
    send(
        "127.0.0.2",
        "mallory@example.org",
        "inbound@dest.test",
        "inbound",
    );

    let signed = sink.wait_for_rcpt("signed@dest.test", Duration::from_secs(20));
    let verdicts = verify(&signed, &dns);
    eprintln!("dkimpy on the signed message: {verdicts:?}");
    assert_eq!(
        verdicts,
        [
            "example.org rsa-sha256 pass",
            "example.org ed25519-sha256 pass"
        ]
    );
    // The signatures come first; after them, exactly what was spooled.
    let text = String::from_utf8_lossy(&signed);
    assert!(text.starts_with("DKIM-Signature:"), "{text}");
    assert!(text.contains("s=rsa2026") && text.contains("s=ed2026"));

    // A changed body no longer verifies: the check can fail.
    let mut tampered = signed.clone();
    let at = find(&tampered, b"Dear reader").unwrap();
    tampered[at] = b'N';
    assert_eq!(
        verify(&tampered, &dns),
        [
            "example.org rsa-sha256 fail",
            "example.org ed25519-sha256 fail"
        ]
    );

    for rcpt in ["unkeyed@dest.test", "inbound@dest.test"] {
        let got = sink.wait_for_rcpt(rcpt, Duration::from_secs(20));
        assert!(
            !contains(&got, b"DKIM-Signature:"),
            "{rcpt} was signed:\n{}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(relay.counter("postern_dkim_signatures_total"), 2);
    assert_eq!(relay.counter("postern_dkim_failures_total"), 0);
    assert!(relay.log().contains("rsa2026._domainkey.example.org"));
}

/// A key the relay will not sign with stops `postern config check`.
#[test]
fn a_short_rsa_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("short.pem");
    genpkey(
        &key,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[[dkim]]\ndomain = \"example.org\"\nselector = \"old\"\nkey_file = \"{}\"\n",
            key.display()
        ),
    )
    .unwrap();
    let output = Command::new(postern_bin())
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("2048 bits"), "{stderr}");
}
