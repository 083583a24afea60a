//! Who may use the admin socket: decided from the connecting process's
//! credentials as the kernel reports them (`SO_PEERCRED`), never from what
//! the client says. Root, the relay's own user and the members of
//! `[admin] group` may; everyone else gets PERMISSION_DENIED with the rule.

use std::ffi::{CStr, CString};
use std::io;

use tonic::service::Interceptor;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// The admin socket's access rule, checked on every request.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    own_uid: u32,
    group: Option<AdminGroup>,
}

/// A group whose members may manage the queue.
#[derive(Debug, Clone)]
struct AdminGroup {
    name: String,
    gid: u32,
    members: Vec<String>,
}

impl AdminAccess {
    /// The rule for this process, with the members of `group` (resolved now).
    pub fn new(group: Option<&str>) -> io::Result<AdminAccess> {
        // SAFETY: getuid cannot fail.
        let own_uid = unsafe { libc::getuid() };
        let group = match group {
            Some(name) => Some(lookup_group(name)?.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("admin.group {name:?}: no such group"),
                )
            })?),
            None => None,
        };
        Ok(AdminAccess { own_uid, group })
    }

    /// Whether a process running as `uid` (primary group `gid`) may.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(group) = &self.group else {
            return false;
        };
        gid == group.gid || user_name(uid).is_some_and(|name| group.members.contains(&name))
    }

    /// The rule, for error messages.
    pub fn describe(&self) -> String {
        match &self.group {
            Some(group) => format!(
                "root, uid {} and members of group {}",
                self.own_uid, group.name
            ),
            None => format!(
                "root and uid {} (set [admin] group to add more)",
                self.own_uid
            ),
        }
    }
}

impl Interceptor for AdminAccess {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        // Requests over TCP carry no credentials: [admin] listen is its own
        // (documented) trust decision, so only Unix connections are checked.
        let Some(info) = request.extensions().get::<UdsConnectInfo>() else {
            return Ok(request);
        };
        let Some(cred) = info.peer_cred else {
            return Err(Status::permission_denied(
                "the kernel did not report who is connecting; refused",
            ));
        };
        if self.allows(cred.uid(), cred.gid()) {
            Ok(request)
        } else {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "admin request refused: not an admin"
            );
            Err(Status::permission_denied(format!(
                "permission denied: uid {} may not manage this relay's queue; {} may",
                cred.uid(),
                self.describe()
            )))
        }
    }
}

/// The group `name`: its id and listed members.
fn lookup_group(name: &str) -> io::Result<Option<AdminGroup>> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed is a valid value for this plain C struct.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory we own for the duration of the
    // call; getgrnam_r writes only into `group` and `buf`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Ok(None);
    }
    let mut members = Vec::new();
    let mut member = group.gr_mem;
    // SAFETY: gr_mem is a NULL-terminated array of C strings inside `buf`.
    unsafe {
        while !member.is_null() && !(*member).is_null() {
            members.push(CStr::from_ptr(*member).to_string_lossy().into_owned());
            member = member.add(1);
        }
    }
    Ok(Some(AdminGroup {
        name: name.to_owned(),
        gid: group.gr_gid,
        members,
    }))
}

/// The login name of `uid`, if it has one.
fn user_name(uid: u32) -> Option<String> {
    crate::users::by_uid(uid).map(|entry| entry.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_own_uid_always_others_only_through_the_group() {
        let alone = AdminAccess::new(None).unwrap();
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        assert!(alone.allows(0, 0));
        assert!(alone.allows(me, 12345));
        assert!(!alone.allows(54321, 54321) || me == 54321);
        // Debian's "nogroup" is nobody's primary group.
        let with_group = AdminAccess::new(Some("nogroup")).unwrap();
        let nogroup = lookup_group("nogroup").unwrap().unwrap().gid;
        assert!(with_group.allows(54321, nogroup));
        assert!(!with_group.allows(54321, 54322));
        assert!(with_group.describe().contains("nogroup"));
    }

    #[test]
    fn an_unknown_group_is_a_configuration_error() {
        let err = AdminAccess::new(Some("no-such-group-postern")).unwrap_err();
        assert!(err.to_string().contains("no such group"), "{err}");
    }
}
