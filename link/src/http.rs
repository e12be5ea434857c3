//! A minimal HTTP/1.0 client for the daemons' own loopback admin endpoints (the CLIs talk to a
//! running daemon through it). Bounded: one request, a response of at most 16 MiB, a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response read.
pub const MAX_RESPONSE: u64 = 16 << 20;

/// Why a request failed. Each cause is in `Display` (callers print it with `{e}`) and is not
/// also a `source()`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("connect to {addr}: {cause}")]
    Connect {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("{addr}: {cause}")]
    Io {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("{addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("{addr} sent a malformed HTTP response")]
    Malformed { addr: SocketAddr },
}

/// A response: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends one request (`authorization` is the header's whole value, e.g. `Bearer t` or
/// `Basic …`; `body` comes with its content type) and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let io = |cause| HttpError::Io { addr, cause };
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|cause| HttpError::Connect { addr, cause })?;
        let auth = authorization
            .map(|t| format!("Authorization: {t}\r\n"))
            .unwrap_or_default();
        let (ctype, data) = match body {
            Some((t, d)) => (format!("Content-Type: {t}\r\n"), d),
            None => (String::new(), &[][..]),
        };
        let head = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}{ctype}Content-Length: {}\r\n\r\n",
            data.len()
        );
        s.write_all(head.as_bytes()).await.map_err(io)?;
        s.write_all(data).await.map_err(io)?;
        let mut buf = Vec::new();
        s.take(MAX_RESPONSE)
            .read_to_end(&mut buf)
            .await
            .map_err(io)?;
        parse(&buf).ok_or(HttpError::Malformed { addr })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout { addr })?
}

fn parse(buf: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(Response {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nno!").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "no!");
        assert!(parse(b"garbage").is_none());
        assert!(parse(b"HTTP/1.1 abc\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn round_trip_and_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.unwrap();
            let req = String::from_utf8_lossy(&b[..n]).to_string();
            assert!(req.contains("Authorization: Bearer t0k"), "{req}");
            assert!(req.ends_with("hello"), "{req}");
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}")
                .await
                .unwrap();
        });
        let r = request(
            addr,
            "POST",
            "/x",
            Some("Bearer t0k"),
            Some(("text/plain", b"hello")),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{\"ok\":true}"));
        let e = request(addr, "GET", "/", None, None, Duration::from_secs(5)).await;
        assert!(matches!(e, Err(HttpError::Connect { .. })), "{e:?}");
    }
}
