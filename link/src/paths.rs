//! Paths named in a configuration file: a relative path means relative to the directory of the
//! file it was written in (never the current directory of whoever started the process), and a
//! path the daemon will need is checked before any store is created, so that a failed start
//! leaves nothing behind.

use std::path::{Path, PathBuf};

use crate::units::ConfigError;

/// The directory relative paths in `config` resolve against: the file's directory, made
/// absolute against the current directory once, at load time.
pub fn base_dir(config: &Path) -> PathBuf {
    let dir = config.parent().unwrap_or(Path::new(""));
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// `p` when absolute, else `base` joined with it.
pub fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The file a key names must exist and be readable now: `key` and the path name it in the
/// error, with the cause once.
pub fn check_readable_file(key: &str, p: &Path) -> Result<(), ConfigError> {
    let fail = |what: String| ConfigError::Invalid(format!("{key} {}: {what}", p.display()));
    let meta = std::fs::metadata(p).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    std::fs::File::open(p).map_err(|e| fail(format!("cannot read: {e}")))?;
    Ok(())
}

/// A directory the daemon will create (or use) at `p`: when it exists it must be a directory;
/// when it does not, its nearest existing ancestor must be a directory (so that creating it
/// can succeed). Nothing is created here.
pub fn check_dir_creatable(key: &str, p: &Path) -> Result<(), ConfigError> {
    let fail = |what: String| ConfigError::Invalid(format!("{key} {}: {what}", p.display()));
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => return Err(fail("exists and is not a directory".into())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e.to_string())),
        Err(_) => {}
    }
    let mut up = p.parent();
    while let Some(a) = up {
        if a.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(a) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(fail(format!(
                    "cannot be created: {} is not a directory",
                    a.display()
                )))
            }
            Err(_) => up = a.parent(),
        }
    }
    Ok(())
}

/// The parent directory of a file the daemon will create at `p` must exist or be creatable.
pub fn check_file_creatable(key: &str, p: &Path) -> Result<(), ConfigError> {
    if p.is_dir() {
        return Err(ConfigError::Invalid(format!(
            "{key} {}: is a directory",
            p.display()
        )));
    }
    match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => check_dir_creatable(key, dir).map_err(|_| {
            ConfigError::Invalid(format!(
                "{key} {}: its directory cannot be created",
                p.display()
            ))
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_config_files_directory() {
        let base = base_dir(Path::new("/etc/mailbell/mailbell.toml"));
        assert_eq!(base, Path::new("/etc/mailbell"));
        assert_eq!(
            resolve(&base, Path::new("var")),
            Path::new("/etc/mailbell/var")
        );
        assert_eq!(resolve(&base, Path::new("/srv/x")), Path::new("/srv/x"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            base_dir(Path::new("m.toml")),
            std::path::absolute(".").unwrap()
        );
        assert!(base_dir(Path::new("m.toml")).starts_with(cwd));
    }

    #[test]
    fn checks_name_the_key_and_the_path_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = check_readable_file("link.cert", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("link.cert "), "{e}");
        assert_eq!(e.matches(&missing.display().to_string()).count(), 1, "{e}");
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
        assert!(check_readable_file("link.ca", dir.path()).is_err());
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        check_readable_file("link.ca", &f).unwrap();
        check_dir_creatable("data_dir", &dir.path().join("a/b/c")).unwrap();
        check_dir_creatable("data_dir", dir.path()).unwrap();
        assert!(check_dir_creatable("data_dir", &f).is_err());
        let e = check_dir_creatable("data_dir", &f.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_dir") && e.to_lowercase().contains("not a directory"),
            "{e}"
        );
        check_file_creatable("pdu_log", &dir.path().join("x/log.jsonl")).unwrap();
        assert!(check_file_creatable("pdu_log", &f.join("log.jsonl")).is_err());
    }
}
