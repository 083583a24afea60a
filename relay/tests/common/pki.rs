//! Test PKIs made with rcgen: a CA, certificates it signs (valid, or
//! expired), written as PEM files. Included with `#[path]` by the tiers that
//! need TLS with client certificates.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority named `name`.
pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate signed by `issuer`; returns (certificate PEM, key PEM).
pub fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (String, String) {
    leaf_with(issuer, common_name, names, usages, |_| {})
}

/// [`leaf`] with `adjust` applied to its parameters (validity, say).
pub fn leaf_with(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
    adjust: impl FnOnce(&mut CertificateParams),
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages;
    // As an ACME or cert-manager certificate: 90 days, from yesterday.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(89);
    adjust(&mut params);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A relay's certificate for the peer channel (server and client use),
/// valid for loopback, with its key and its CA, as files in `dir` named
/// `<name>.crt`, `<name>.key` and `<name>-ca.crt`: the
/// `[cluster.tls]` settings.
pub fn member_files(
    dir: &Path,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
) -> postern::config::MutualTlsFiles {
    member_files_with(dir, issuer, name, |_| {})
}

/// [`member_files`] with `adjust` applied to the certificate's parameters.
pub fn member_files_with(
    dir: &Path,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    adjust: impl FnOnce(&mut CertificateParams),
) -> postern::config::MutualTlsFiles {
    let (cert, key) = leaf_with(
        issuer,
        name,
        &["127.0.0.1", "localhost"],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        adjust,
    );
    postern::config::MutualTlsFiles {
        cert_file: write(dir, &format!("{name}.crt"), &cert),
        key_file: write(dir, &format!("{name}.key"), &key),
        ca_file: write(dir, &format!("{name}-ca.crt"), &issuer.pem()),
        member_name: None,
    }
}
