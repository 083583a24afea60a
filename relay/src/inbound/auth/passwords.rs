//! `[auth] password_file`: `user:hash` lines checked with crypt-style hashes
//! only — argon2id (PHC string), bcrypt and SHA-512-crypt — so the file never
//! holds a password a reader could use. Dovecot's `{SCHEME}` prefixes are
//! accepted (`{ARGON2ID}`, `{BLF-CRYPT}`, `{SHA512-CRYPT}`), so one file can
//! serve both; fields after the hash (Dovecot's uid, gid, …) are ignored.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordVerifier};

/// A hash scheme the file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Argon2id,
    Bcrypt,
    Sha512Crypt,
}

impl Scheme {
    fn of(hash: &str) -> Option<Scheme> {
        if hash.starts_with("$argon2id$") {
            Some(Scheme::Argon2id)
        } else if ["$2b$", "$2y$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
            Some(Scheme::Bcrypt)
        } else if hash.starts_with("$6$") {
            Some(Scheme::Sha512Crypt)
        } else {
            None
        }
    }
}

/// Why a password file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A line is not `user:hash` with a hash we accept.
    #[error("{path} line {line}: {why}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the hash or a password).
        why: String,
    },
}

/// One user's stored hash.
#[derive(Clone)]
struct Entry {
    scheme: Scheme,
    hash: String,
}

/// The users of a password file.
#[derive(Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, Entry>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Checked for users not in the file, so a wrong user name costs about as
/// long as a wrong password (no timing oracle for which users exist): the
/// bcrypt hash of a random string nobody knows, made once.
static ABSENT_USER_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let secret: [u8; 16] = rand::random();
    bcrypt::hash(secret, 10).unwrap_or_default()
});

impl PasswordFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PasswordFile::parse(&text).map_err(|(line, why)| PasswordFileError::Line {
            path: path.display().to_string(),
            line,
            why,
        })
    }

    /// Parses the text of a password file; an error names the line.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, rest)) = line.split_once(':') else {
                return Err((line_number, "expected user:hash".into()));
            };
            let hash = rest.split(':').next().unwrap_or("");
            let hash = match hash.strip_prefix('{') {
                Some(prefixed) => prefixed.split_once('}').map_or("", |(_, hash)| hash),
                None => hash,
            };
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err((
                    line_number,
                    format!("user name {user:?} is empty or has spaces"),
                ));
            }
            let Some(scheme) = Scheme::of(hash) else {
                return Err((
                    line_number,
                    format!(
                        "the hash for {user:?} is not argon2id ($argon2id$), bcrypt ($2b$) or \
                         SHA-512-crypt ($6$); plaintext and other schemes are refused"
                    ),
                ));
            };
            if scheme == Scheme::Argon2id
                && !PasswordHash::new(hash).is_ok_and(|parsed| parsed.hash.is_some())
            {
                return Err((
                    line_number,
                    format!("the argon2id hash for {user:?} is malformed"),
                ));
            }
            if users
                .insert(
                    user.to_owned(),
                    Entry {
                        scheme,
                        hash: hash.to_owned(),
                    },
                )
                .is_some()
            {
                return Err((line_number, format!("user {user:?} appears twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// How many users the file has.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Slow on purpose (the hashes are): run
    /// it on a blocking thread.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(entry) = self.users.get(user) else {
            let _ = bcrypt::verify(password, &ABSENT_USER_HASH);
            return false;
        };
        match entry.scheme {
            Scheme::Argon2id => PasswordHash::new(&entry.hash).is_ok_and(|hash| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            }),
            Scheme::Bcrypt => bcrypt::verify(password, &entry.hash).unwrap_or(false),
            Scheme::Sha512Crypt => sha_crypt::sha512_check(password, &entry.hash).is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, SaltString};

    fn argon2id(password: &str) -> String {
        let salt = SaltString::encode_b64(b"saltsaltsaltsalt").unwrap();
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn each_scheme_checks_its_password_and_only_that() {
        let sha =
            sha_crypt::sha512_simple("s3", &sha_crypt::Sha512Params::new(5000).unwrap()).unwrap();
        let text = format!(
            "# users\nalice:{}\nbob:{}\ncarol:{{SHA512-CRYPT}}{sha}:1000:1000::/home/carol\n",
            argon2id("s1"),
            bcrypt::hash("s2", 4).unwrap(),
        );
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 3);
        assert!(file.verify("alice", "s1"));
        assert!(!file.verify("alice", "s2"));
        assert!(file.verify("bob", "s2"));
        assert!(!file.verify("bob", "S2"));
        assert!(file.verify("carol", "s3"));
        assert!(!file.verify("carol", ""));
        assert!(!file.verify("dave", "s1"), "unknown user");
        assert!(!file.verify("Alice", "s1"), "user names are exact");
    }

    #[test]
    fn plaintext_unknown_schemes_and_bad_lines_are_refused_with_their_line() {
        for (text, line, says) in [
            ("alice:secret\n", 1, "plaintext"),
            ("\nbob:{PLAIN}secret\n", 2, "plaintext"),
            ("carol:$1$abc$def\n", 1, "SHA-512-crypt"),
            ("no colon here\n", 1, "user:hash"),
            ("dave:$argon2id$v=19$garbage\n", 1, "malformed"),
            (":$6$salt$hash\n", 1, "empty"),
        ] {
            let (at, why) = PasswordFile::parse(text).unwrap_err();
            assert_eq!(at, line, "{text:?}");
            assert!(why.contains(says), "{text:?}: {why}");
            assert!(!why.contains("secret"), "a password in an error: {why}");
        }
        let twice = format!("a:{h}\na:{h}\n", h = bcrypt::hash("x", 4).unwrap());
        assert_eq!(PasswordFile::parse(&twice).unwrap_err().0, 2);
    }
}
