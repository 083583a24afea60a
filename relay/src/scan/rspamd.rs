//! rspamd's HTTP protocol (`POST /checkv2`): the envelope goes in request
//! headers (`From`, `Rcpt`, `IP`, `Helo`, `Queue-Id`, `User`), the message
//! either in the body or, when rspamd shares the spool's filesystem, as a
//! path in the `File` header (rspamd reads the file; nothing crosses the
//! socket). The JSON answer's `action` becomes our verdict; the headers
//! rspamd asks an MTA to add (`milter.add_headers`) are added.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{header, ScanError, ScanRequest, Verdict};
use crate::config::ScannerConfig;
use crate::smtp::Reply;

/// Largest answer read from rspamd.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Asks rspamd at `config.address` about the message.
pub async fn scan(config: &ScannerConfig, request: &ScanRequest<'_>) -> Result<Verdict, ScanError> {
    let body = if config.pass_file {
        Vec::new()
    } else {
        let mut body = request.envelope.added_headers.clone().into_bytes();
        body.extend(tokio::fs::read(request.data_path).await.map_err(|err| {
            ScanError(format!(
                "cannot read {}: {err}",
                request.data_path.display()
            ))
        })?);
        body
    };
    let head = request_head(config, request, body.len())?;
    let mut stream = TcpStream::connect(&config.address)
        .await
        .map_err(|err| ScanError(format!("rspamd at {}: {err}", config.address)))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(head.as_bytes())
        .await
        .and(stream.write_all(&body).await)
        .map_err(|err| ScanError(format!("rspamd at {}: {err}", config.address)))?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut response)
        .await
        .map_err(|err| ScanError(format!("rspamd at {}: {err}", config.address)))?;
    answer(&response)
}

/// rspamd's whole HTTP response, as a verdict.
pub fn answer(response: &[u8]) -> Result<Verdict, ScanError> {
    verdict(&parse_http(response)?)
}

/// The request line and headers.
fn request_head(
    config: &ScannerConfig,
    request: &ScanRequest<'_>,
    body_len: usize,
) -> Result<String, ScanError> {
    let envelope = request.envelope;
    let mut head = format!(
        "POST /checkv2 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {body_len}\r\n",
        config.address
    );
    let mut add = |name: &str, value: &str| {
        // Envelope values passed the SMTP parser, but never let one break a line.
        if !value.contains(['\r', '\n']) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    };
    add(
        "From",
        &envelope
            .reverse_path
            .as_ref()
            .map(|m| m.address())
            .unwrap_or_default(),
    );
    for recipient in &envelope.recipients {
        add("Rcpt", &recipient.address.address());
    }
    if let Some(ip) = request.client_ip {
        add("IP", &ip.to_string());
    }
    add("Helo", &envelope.client.helo);
    add("Queue-Id", &envelope.id);
    add("MTA-Name", request.hostname);
    if let Some(user) = request.user {
        add("User", user);
    }
    if config.pass_file {
        add("File", &percent_encode(&absolute(request.data_path)?));
    }
    head.push_str("\r\n");
    Ok(head)
}

/// rspamd URL-decodes the `File` value: everything but `[A-Za-z0-9._/-]`
/// goes as `%XX`.
fn percent_encode(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"._/-".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn absolute(path: &Path) -> Result<std::path::PathBuf, ScanError> {
    std::path::absolute(path)
        .map_err(|err| ScanError(format!("spool path {}: {err}", path.display())))
}

/// The JSON body of an HTTP/1.1 response (Content-Length, chunked or to EOF).
fn parse_http(response: &[u8]) -> Result<Value, ScanError> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ScanError("rspamd: incomplete HTTP response".into()))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| ScanError(format!("rspamd: bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            }
        }
    }
    let raw = &response[end + 4..];
    let body = if chunked {
        dechunk(raw)?
    } else {
        match length {
            Some(length) if raw.len() >= length => raw[..length].to_vec(),
            Some(_) => return Err(ScanError("rspamd: response shorter than its length".into())),
            None => raw.to_vec(),
        }
    };
    if status != 200 {
        return Err(ScanError(format!(
            "rspamd answered HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    serde_json::from_slice(&body).map_err(|err| ScanError(format!("rspamd: bad JSON: {err}")))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, ScanError> {
    let bad = || ScanError("rspamd: bad chunked encoding".into());
    let mut body = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").ok_or_else(bad)?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad())?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if raw.len() < size + 2 {
            return Err(bad());
        }
        body.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Maps rspamd's answer onto a verdict.
pub fn verdict(json: &Value) -> Result<Verdict, ScanError> {
    let action = json
        .get("action")
        .and_then(Value::as_str)
        .ok_or_else(|| ScanError("rspamd: answer without an action".into()))?;
    let score = json.get("score").and_then(Value::as_f64).unwrap_or(0.0);
    let required = json
        .get("required_score")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let told = json
        .pointer("/messages/smtp_message")
        .and_then(Value::as_str)
        .filter(|text| !text.contains(['\r', '\n']));
    match action {
        "reject" => Ok(Verdict::Reject(Reply::new(
            550,
            "5.7.1",
            told.map(str::to_owned).unwrap_or_else(|| {
                format!("Message refused as spam (score {score:.2} of {required:.2})")
            }),
        ))),
        "soft reject" | "greylist" => Ok(Verdict::Tempfail(Reply::new(
            451,
            "4.7.1",
            told.map(str::to_owned).unwrap_or_else(|| {
                "Message deferred by the content scanner, try again later".into()
            }),
        ))),
        "add header" | "rewrite subject" | "no action" => {
            let mut headers = milter_headers(json);
            if action != "no action" {
                // rspamd's own MTA integrations mark spam this way; we cannot
                // rewrite the Subject of an immutable message.
                headers.push_str("X-Spam: Yes\r\n");
            }
            Ok(Verdict::Accept { headers })
        }
        other => Err(ScanError(format!("rspamd: unknown action {other:?}"))),
    }
}

/// `milter.add_headers`: `{name: value}`, `{name: {value, order}}` or
/// `{name: [values…]}`, in name order.
fn milter_headers(json: &Value) -> String {
    let Some(add) = json
        .pointer("/milter/add_headers")
        .and_then(Value::as_object)
    else {
        return String::new();
    };
    let mut out = String::new();
    for (name, spec) in add {
        let values: Vec<&Value> = match spec {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for value in values {
            let text = match value {
                Value::String(text) => Some(text.as_str()),
                Value::Object(fields) => fields.get("value").and_then(Value::as_str),
                _ => None,
            };
            if let Some(line) = text.and_then(|text| header::format(name, text)) {
                out.push_str(&line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn actions_map_to_verdicts() {
        let reject =
            verdict(&json!({"action": "reject", "score": 1000.0, "required_score": 15.0})).unwrap();
        assert!(
            matches!(&reject, Verdict::Reject(r) if r.code == 550 && r.lines[0].contains("1000.00"))
        );
        let soft = verdict(&json!({"action": "soft reject"})).unwrap();
        assert!(matches!(&soft, Verdict::Tempfail(r) if r.code == 451));
        let told =
            verdict(&json!({"action": "reject", "messages": {"smtp_message": "Go away"}})).unwrap();
        assert!(matches!(&told, Verdict::Reject(r) if r.lines == vec!["Go away".to_owned()]));
        assert_eq!(
            verdict(&json!({"action": "add header"})).unwrap(),
            Verdict::Accept {
                headers: "X-Spam: Yes\r\n".into()
            }
        );
        assert_eq!(
            verdict(&json!({"action": "no action"})).unwrap(),
            Verdict::Accept {
                headers: String::new()
            }
        );
        assert!(verdict(&json!({"action": "explode"})).is_err());
        assert!(verdict(&json!({"score": 1})).is_err());
    }

    #[test]
    fn milter_headers_in_every_shape() {
        let answer = json!({"action": "no action", "milter": {"add_headers": {
            "X-Spamd-Result": {"value": "default: False [0.00 / 15.00]", "order": 0},
            "X-Rspamd-Server": "scanner",
            "X-Multi": ["a", {"value": "b", "order": 1}],
            "Bad Name": "dropped"
        }}});
        let Verdict::Accept { headers } = verdict(&answer).unwrap() else {
            panic!("not accepted");
        };
        assert_eq!(
            headers,
            "X-Multi: a\r\nX-Multi: b\r\nX-Rspamd-Server: scanner\r\nX-Spamd-Result: default: False [0.00 / 15.00]\r\n"
        );
    }

    #[test]
    fn file_paths_are_percent_encoded() {
        assert_eq!(
            percent_encode(Path::new("/var/spool/a+b c%.data_path")),
            "/var/spool/a%2Bb%20c%25.data_path"
        );
        assert_eq!(
            percent_encode(Path::new("/d/01ABC.data_path")),
            "/d/01ABC.data_path"
        );
    }

    #[test]
    fn http_bodies_plain_chunked_and_errors() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"action\":\"reject\"}\n";
        assert_eq!(parse_http(plain).unwrap()["action"], "reject");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked).unwrap()["a"], 1);
        let error = b"HTTP/1.1 500 Internal\r\nContent-Length: 4\r\n\r\noops";
        assert!(parse_http(error).unwrap_err().0.contains("HTTP 500"));
        assert!(parse_http(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
