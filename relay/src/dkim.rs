//! DKIM signing (RFC 6376, Ed25519 per RFC 8463) with `mail-auth`: the keys
//! of `[[dkim]]`, and the signatures for one message. A message is signed
//! once, at the end of data, with every key whose domain is its `From:`
//! address's domain or a parent of it; the signatures travel in the
//! envelope's added headers and go out before the message, which stays
//! byte for byte as it was spooled.

use std::path::{Path, PathBuf};

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done, NeedDomain};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::config::DkimConfig;

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DkimError {
    /// The key file cannot be read or holds no PEM private key.
    #[error("dkim key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key).
        reason: String,
    },
    /// Signing failed.
    #[error("DKIM signing for {domain} failed: {reason}")]
    Sign {
        /// The signing domain.
        domain: String,
        /// mail-auth's error.
        reason: String,
    },
}

/// One key ready to sign.
enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

struct Key {
    domain: String,
    selector: String,
    signer: Signer,
}

/// The relay's signing keys.
pub struct DkimKeys {
    keys: Vec<Key>,
}

impl std::fmt::Debug for DkimKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.keys
                    .iter()
                    .map(|k| format!("{}/{}", k.domain, k.selector)),
            )
            .finish()
    }
}

/// The smallest RSA public key we sign with: a 2048-bit key's PKCS#1
/// encoding is 270 octets, a 1024-bit one's 140 (RFC 8301 forbids < 1024,
/// and 2048 is what receivers expect today).
const MIN_RSA_PUBLIC_KEY_DER: usize = 260;

fn key_error(path: &Path, reason: impl std::fmt::Display) -> DkimError {
    DkimError::Key {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Domain, selector, headers, and relaxed canonicalization for both parts
/// (what survives the whitespace and header-case changes of forwarders).
fn configure<T: SigningKey>(
    signer: DkimSigner<T, NeedDomain>,
    config: &DkimConfig,
) -> DkimSigner<T, Done> {
    signer
        .domain(config.domain.trim_end_matches('.').to_ascii_lowercase())
        .selector(config.selector.clone())
        .headers(config.headers.clone())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

fn load_key(config: &DkimConfig) -> Result<Key, DkimError> {
    let path = &config.key_file;
    let der = PrivateKeyDer::from_pem_file(path).map_err(|err| key_error(path, err))?;
    let signer = match RsaKey::<Sha256>::from_key_der(der.clone_key()) {
        Ok(rsa) => {
            if rsa.public_key().len() < MIN_RSA_PUBLIC_KEY_DER {
                return Err(key_error(path, "RSA keys must have 2048 bits or more"));
            }
            Signer::Rsa(configure(DkimSigner::from_key(rsa), config))
        }
        Err(rsa_err) if rsa_err.to_string().contains("TooSmall") => {
            return Err(key_error(path, "RSA keys must have 2048 bits or more"));
        }
        Err(rsa_err) => match &der {
            PrivateKeyDer::Pkcs8(pkcs8) => {
                // openssl writes PKCS#8 v1, without the public key.
                let ed25519 = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                    .map_err(|err| {
                        key_error(path, format!("neither RSA ({rsa_err}) nor Ed25519 ({err})"))
                    })?;
                Signer::Ed25519(configure(DkimSigner::from_key(ed25519), config))
            }
            _ => return Err(key_error(path, rsa_err)),
        },
    };
    Ok(Key {
        domain: config.domain.trim_end_matches('.').to_ascii_lowercase(),
        selector: config.selector.clone(),
        signer,
    })
}

impl DkimKeys {
    /// Loads every key of `[[dkim]]`; `None` when there are none.
    pub fn load(configs: &[DkimConfig]) -> Result<Option<DkimKeys>, DkimError> {
        if configs.is_empty() {
            return Ok(None);
        }
        let keys = configs.iter().map(load_key).collect::<Result<_, _>>()?;
        Ok(Some(DkimKeys { keys }))
    }

    /// The keys for a `From:` address's domain: its own, or else those of
    /// its nearest parent that has keys (a DMARC-aligned `d=`).
    fn keys_for(&self, from_domain: &str) -> Vec<&Key> {
        let mut domain = from_domain.trim_end_matches('.').to_ascii_lowercase();
        loop {
            let keys: Vec<&Key> = self.keys.iter().filter(|k| k.domain == domain).collect();
            if !keys.is_empty() {
                return keys;
            }
            match domain.split_once('.') {
                Some((_, parent)) if parent.contains('.') => domain = parent.to_owned(),
                _ => return Vec::new(),
            }
        }
    }

    /// The `DKIM-Signature:` header fields (each CRLF-terminated, to go
    /// before the message) for `message`, none when no key matches its
    /// `From:`. CPU work proportional to the message: call it on a blocking
    /// thread.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<String>, DkimError> {
        let Some(parsed) = mail_auth::AuthenticatedMessage::parse(message) else {
            return Ok(Vec::new());
        };
        let Some(domain) = parsed
            .from
            .first()
            .and_then(|from| from.rsplit_once('@'))
            .map(|(_, domain)| domain.to_owned())
        else {
            return Ok(Vec::new());
        };
        let mut headers = Vec::new();
        for key in self.keys_for(&domain) {
            let signature = match &key.signer {
                Signer::Rsa(signer) => signer.sign(message),
                Signer::Ed25519(signer) => signer.sign(message),
            }
            .map_err(|err| DkimError::Sign {
                domain: key.domain.clone(),
                reason: err.to_string(),
            })?;
            headers.push(signature.to_header());
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(domains: &[&str]) -> DkimKeys {
        let dir = tempfile::tempdir().unwrap();
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
        let path = dir.path().join("ed25519.pem");
        std::fs::write(
            &path,
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                crate::smtp::base64::encode(&pkcs8)
            ),
        )
        .unwrap();
        let configs: Vec<DkimConfig> = domains
            .iter()
            .map(|domain| DkimConfig {
                domain: domain.to_string(),
                selector: "s1".into(),
                key_file: path.clone(),
                headers: crate::config::default_dkim_headers(),
            })
            .collect();
        DkimKeys::load(&configs).unwrap().unwrap()
    }

    #[test]
    fn the_from_domain_or_its_nearest_parent_with_keys_signs() {
        let keys = keys(&["example.org", "news.example.org"]);
        let domains = |from: &str| -> Vec<String> {
            keys.keys_for(from)
                .iter()
                .map(|k| k.domain.clone())
                .collect()
        };
        assert_eq!(domains("Example.ORG"), ["example.org"]);
        assert_eq!(domains("news.example.org"), ["news.example.org"]);
        assert_eq!(domains("a.b.example.org"), ["example.org"]);
        assert!(domains("example.net").is_empty());
        assert!(domains("org").is_empty());

        let signed = keys
            .sign(b"From: Alice <alice@a.example.org>\r\nSubject: hi\r\n\r\nbody\r\n")
            .unwrap()
            .concat();
        assert!(
            signed.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
            "{signed}"
        );
        assert!(
            signed.contains("d=example.org") && signed.contains("s=s1"),
            "{signed}"
        );
        assert!(signed.ends_with("\r\n"));
        assert!(
            keys.sign(b"From: bob@example.net\r\n\r\nbody\r\n")
                .unwrap()
                .is_empty(),
            "no key for example.net"
        );
    }

    #[test]
    fn a_file_without_a_key_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = |path: PathBuf| DkimConfig {
            domain: "example.org".into(),
            selector: "s1".into(),
            key_file: path,
            headers: crate::config::default_dkim_headers(),
        };
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a key\n").unwrap();
        let err = DkimKeys::load(&[config(empty)]).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
        let missing = DkimKeys::load(&[config(dir.path().join("missing.pem"))]);
        assert!(missing.is_err());
    }
}
