//! The shared-secret check of the peer API: clients attach
//! `authorization: Bearer <secret>`, the server compares it in constant time
//! before any handler runs.

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::PeerError;

/// The metadata key carrying the credentials.
const AUTHORIZATION: &str = "authorization";

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// Server interceptor: refuses with UNAUTHENTICATED every request whose
/// `authorization` is not `Bearer <secret>`.
///
/// Both sides are hashed first and the digests compared without early exit,
/// so the time taken tells nothing about the secret, not even its length.
#[derive(Clone)]
pub struct RequireSecret {
    expected: [u8; 32],
}

impl std::fmt::Debug for RequireSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireSecret(..)")
    }
}

impl RequireSecret {
    /// A check for `secret`.
    pub fn new(secret: &str) -> RequireSecret {
        RequireSecret {
            expected: Sha256::digest(bearer(secret).as_bytes()).into(),
        }
    }

    /// Whether `presented` is the expected header value.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        constant_time_eq(&digest, &self.expected)
    }
}

impl Interceptor for RequireSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get(AUTHORIZATION) {
            Some(value) if self.accepts(value.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster secret")),
            None => Err(Status::unauthenticated("the cluster secret is required")),
        }
    }
}

/// Compares two equally long byte strings in time independent of where they
/// differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Client interceptor: attaches `authorization: Bearer <secret>`.
#[derive(Clone)]
pub struct AttachSecret {
    value: MetadataValue<Ascii>,
}

impl std::fmt::Debug for AttachSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttachSecret(..)")
    }
}

impl AttachSecret {
    /// Credentials for `secret`; it must be visible ASCII.
    pub fn new(secret: &str) -> Result<AttachSecret, PeerError> {
        if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PeerError::InvalidSecret);
        }
        let value = bearer(secret)
            .parse()
            .map_err(|_| PeerError::InvalidSecret)?;
        Ok(AttachSecret { value })
    }
}

impl Interceptor for AttachSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, value.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_exact_bearer_secret_passes() {
        let mut check = RequireSecret::new("s3cret-s3cret-s3cret");
        assert!(check
            .call(with(Some("Bearer s3cret-s3cret-s3cret")))
            .is_ok());
        for wrong in [
            Some("Bearer s3cret-s3cret-s3creT"),
            Some("Bearer s3cret-s3cret-s3cret "),
            Some("s3cret-s3cret-s3cret"),
            Some("Bearer "),
            None,
        ] {
            let status = check.call(with(wrong)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    #[test]
    fn the_client_side_attaches_what_the_server_side_expects() {
        let mut attach = AttachSecret::new("s3cret-s3cret-s3cret").unwrap();
        let request = attach.call(Request::new(())).unwrap();
        assert!(RequireSecret::new("s3cret-s3cret-s3cret")
            .call(request)
            .is_ok());
        assert!(AttachSecret::new("with space").is_err());
        assert!(AttachSecret::new("line\nbreak").is_err());
        assert!(AttachSecret::new("").is_err());
    }
}
