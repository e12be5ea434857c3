//! Who the state belongs to. Phone numbers are personal data, so everything mailbell creates
//! is `0750` (directories) and `0640` (files): [`UMASK`], set at startup. And the admin
//! commands, when they open the stores themselves (daemon stopped), must not leave files the
//! daemon cannot open: run as root against a data directory that belongs to the daemon's
//! user, they refuse and say which user to run as ([`decide`]), instead of creating
//! root-owned store files (which made the daemon fail with `open outbox … Permission denied`).
//!
//! Refusing rather than switching to the owner (setuid): the command reads files named on its
//! command line (`user import FILE`) that the daemon's user may not be able to read, and a
//! privilege switch inside a multi-threaded process is easy to get subtly wrong. `sudo -u`
//! does the same switch, visibly.

use std::path::{Path, PathBuf};

/// Masks group write and all access for others: directories `0750`, files `0640`.
pub const UMASK: u32 = 0o027;

/// Sets the process umask to [`UMASK`] (before anything is created).
#[allow(unsafe_code)]
pub fn restrict_umask() {
    // SAFETY: umask only swaps the process's file-creation mask; it touches no memory of ours.
    unsafe {
        libc::umask(UMASK as libc::mode_t);
    }
}

/// Why the admin commands will not open the stores.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OwnershipError {
    #[error(
        "{} belongs to uid {owner} (the daemon's user), but this command runs as root: \
         files it creates would be root's and the daemon could not open them; run it as \
         that user (sudo -u '#{owner}' mailbell ...) or start the daemon so that the \
         command goes through its admin API",
        path.display()
    )]
    RootOnOthersData { path: PathBuf, owner: u32 },
}

/// The decision, without I/O: `euid` is ours; `owner` is the uid of `path`, the data
/// directory or, when that does not exist yet, its nearest existing ancestor (whoever owns
/// that decides who the new directory is for).
pub fn decide(euid: u32, path: &Path, owner: u32) -> Result<(), OwnershipError> {
    if euid == 0 && owner != 0 {
        return Err(OwnershipError::RootOnOthersData {
            path: path.to_owned(),
            owner,
        });
    }
    // Not root: the kernel's permission checks are the rule (a 0750 directory of another
    // user is read-only or closed to us, and we cannot create files owned by anyone else).
    Ok(())
}

/// [`decide`] for `data_dir` as this process. An ancestor that cannot be read at all leaves
/// the decision to the kernel (opening will fail with its own error).
pub fn check(data_dir: &Path) -> Result<(), OwnershipError> {
    use std::os::unix::fs::MetadataExt;
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let Some((path, meta)) = absolute
        .ancestors()
        .find_map(|p| std::fs::metadata(p).ok().map(|m| (p, m)))
    else {
        return Ok(());
    };
    decide(euid(), path, meta.uid())
}

#[allow(unsafe_code)]
fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_refuses_another_users_data_and_everyone_else_leaves_it_to_the_kernel() {
        let p = Path::new("/var/lib/mailbell");
        assert_eq!(decide(0, p, 0), Ok(()));
        assert_eq!(decide(998, p, 998), Ok(()));
        assert_eq!(decide(998, p, 0), Ok(()));
        assert_eq!(decide(1000, p, 998), Ok(()));
        let e = decide(0, p, 998).unwrap_err().to_string();
        assert!(
            e.contains("/var/lib/mailbell") && e.contains("uid 998") && e.contains("sudo -u"),
            "{e}"
        );
    }
}
