//! Telling systemd that a daemon is ready (`Type=notify`): the sd_notify(3) datagram
//! `READY=1` to the socket named by `$NOTIFY_SOCKET`, without libsystemd.
//!
//! Both daemons send it once every listener is bound, so that units ordered after them
//! (Postfix after mailbell's milter, mailbell after the agent) start only once they listen.
//! Without `$NOTIFY_SOCKET` (not under systemd, or `Type=simple`) nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `READY=1` to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
pub fn notify_ready() -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    send(&path, b"READY=1")?;
    Ok(true)
}

/// Sends one notification to a socket path, or to an abstract socket (a leading `@`).
fn send(path: &std::ffi::OsStr, message: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message, &addr)?;
        }
        _ => {
            sock.send_to(message, path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
