//! Password authentication for submission listeners (`[auth]`): where
//! passwords are checked (a file of hashes, or Dovecot), which senders a
//! user may use, and how failures are slowed down.

pub mod dovecot;
pub mod passwords;
pub mod senders;
pub mod throttle;

use std::sync::Arc;

use crate::config::AuthConfig;
use crate::smtp::Credentials;
use crate::watch::Reloading;
use dovecot::{DovecotAnswer, DovecotAuth, DovecotError};
use passwords::{PasswordFile, PasswordFileError};
use senders::SenderLogins;
use throttle::AuthThrottle;

/// Where passwords are checked.
#[derive(Debug)]
enum Checker {
    File(Reloading<PasswordFile>),
    Dovecot(DovecotAuth),
}

/// The answer about one set of credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Right: the session is this user's.
    Valid {
        /// The user's name, as the backend knows it.
        user: String,
    },
    /// Wrong password, unknown user, or a request to act as someone else.
    Invalid {
        /// Why, when the backend said (for the log; never the password).
        reason: Option<String>,
    },
}

/// Why no answer could be had (the client hears 454 4.7.0 and may retry).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Dovecot did not answer usefully.
    #[error(transparent)]
    Dovecot(#[from] DovecotError),
    /// The hashing thread went away.
    #[error("the password check did not finish")]
    Worker,
}

/// Everything submission listeners need to authenticate clients.
#[derive(Debug)]
pub struct SubmissionAuth {
    checker: Checker,
    /// Hashes checked at once: each argon2id check may take tens of MiB,
    /// so a flood of attempts waits here instead of exhausting memory.
    hashing: tokio::sync::Semaphore,
    /// Failure counts and delays.
    pub throttle: AuthThrottle,
    /// Which senders each user may use.
    pub senders: SenderLogins,
}

impl SubmissionAuth {
    /// From `[auth]`; `None` when it names no credential source.
    pub fn new(config: &AuthConfig) -> Result<Option<SubmissionAuth>, PasswordFileError> {
        let checker = match (&config.password_file, &config.dovecot) {
            (Some(path), _) => {
                let first = PasswordFile::load(path)?;
                tracing::info!(file = %path.display(), users = first.len(), "password file loaded");
                let reload_path = path.clone();
                Checker::File(
                    Reloading::new(first, vec![path.clone()], move || {
                        PasswordFile::load(&reload_path).map_err(|err| err.to_string())
                    })
                    .describing("password file"),
                )
            }
            (None, Some(address)) => {
                Checker::Dovecot(DovecotAuth::new(address, config.dovecot_timeout))
            }
            (None, None) => return Ok(None),
        };
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Ok(Some(SubmissionAuth {
            checker,
            hashing: tokio::sync::Semaphore::new(cores),
            throttle: AuthThrottle::new(config),
            senders: SenderLogins::new(config),
        }))
    }

    /// Checks what a client presented.
    pub async fn check(
        &self,
        credentials: &Credentials,
        client: Option<std::net::IpAddr>,
    ) -> Result<Checked, AuthError> {
        match &self.checker {
            Checker::File(file) => {
                if !credentials.authzid.is_empty() && credentials.authzid != credentials.user {
                    return Ok(Checked::Invalid {
                        reason: Some("acting as another user is not allowed".into()),
                    });
                }
                let _permit = self
                    .hashing
                    .acquire()
                    .await
                    .map_err(|_| AuthError::Worker)?;
                let file: Arc<PasswordFile> = file.current();
                let user = credentials.user.clone();
                let password = credentials.password.clone();
                let valid =
                    tokio::task::spawn_blocking(move || file.verify(&user, password.expose()))
                        .await
                        .map_err(|_| AuthError::Worker)?;
                Ok(if valid {
                    Checked::Valid {
                        user: credentials.user.clone(),
                    }
                } else {
                    Checked::Invalid { reason: None }
                })
            }
            Checker::Dovecot(dovecot) => {
                let answer = dovecot
                    .check(
                        &credentials.authzid,
                        &credentials.user,
                        credentials.password.expose(),
                        client,
                    )
                    .await?;
                Ok(match answer {
                    DovecotAnswer::Ok { user } => Checked::Valid { user },
                    DovecotAnswer::Fail { reason } => Checked::Invalid { reason },
                })
            }
        }
    }
}
