//! Local accounts: the passwd entry of a uid (getpwuid_r), for the
//! peer-credential checks of the admin and submission sockets and for
//! `postern sendmail`'s own user.

use std::ffi::CStr;

/// What the passwd database says about a uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// The GECOS field (full name, office, ...), if set.
    pub gecos: Option<String>,
}

/// The passwd entry of `uid`, if it has one.
pub fn by_uid(uid: u32) -> Option<PasswdEntry> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed is a valid value for this plain C struct.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory we own for the call's duration;
    // getpwuid_r writes strings only into `buf`.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut passwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || passwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name and pw_gecos point to C strings inside `buf` (or are null).
    let name = unsafe { CStr::from_ptr(passwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    let gecos = (!passwd.pw_gecos.is_null()).then(|| {
        // SAFETY: checked non-null just above.
        unsafe { CStr::from_ptr(passwd.pw_gecos) }
            .to_string_lossy()
            .into_owned()
    });
    Some(PasswdEntry { name, gecos })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_zero() {
        assert_eq!(by_uid(0).map(|entry| entry.name).as_deref(), Some("root"));
    }
}
