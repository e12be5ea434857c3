//! Reading request bodies: whole (small, bounded) or streamed into a blocking parser.
//!
//! Streaming: the async side pulls body frames (enforcing the size limit and the deadline) and
//! passes them through a bounded channel to a `spawn_blocking` task, where a
//! [`std::io::Read`] over that channel feeds `serde_json::from_reader`. serde_json's `IoRead`
//! reads byte by byte and skips an ignored string (`IgnoredAny`, or an unknown key) in
//! `ignore_str` without copying it anywhere, so memory stays at most
//! `STREAM_CHANNEL_CHUNKS` chunks + the `BufReader` + the largest string actually kept, whatever
//! the size of `message.contents`.

use std::io::{self, BufRead, Read};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks in flight between the body and the parser.
const STREAM_CHANNEL_CHUNKS: usize = 8;
/// Read buffer of the blocking parser.
const STREAM_BUF: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("body not received in time")]
    Timeout,
    #[error("reading the body: {0}")]
    Read(axum::Error),
}

/// Why a streamed parse failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError<E> {
    #[error(transparent)]
    Body(BodyError),
    #[error(transparent)]
    Parse(E),
    #[error("parser task failed: {0}")]
    Task(tokio::task::JoinError),
}

/// Next non-empty data chunk, `None` at the end. Trailers are skipped.
async fn next_chunk(body: &mut Body, deadline: Instant) -> Result<Option<Bytes>, BodyError> {
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(BodyError::Read(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                return Ok(Some(data));
            }
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes.
pub(crate) async fn read_all(
    mut body: Body,
    limit: u64,
    deadline: Instant,
) -> Result<Bytes, BodyError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = next_chunk(&mut body, deadline).await? {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Streams the body into `parse`, which runs on a blocking thread and reads it through
/// [`std::io::Read`]. A body error (too large, too slow) wins over the parse error it causes.
pub(crate) async fn parse_streaming<T, E, F>(
    mut body: Body,
    limit: u64,
    deadline: Instant,
    parse: F,
) -> Result<T, StreamError<E>>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce(&mut dyn BufRead) -> Result<T, E> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CHUNKS);
    let task = tokio::task::spawn_blocking(move || {
        let mut reader = io::BufReader::with_capacity(STREAM_BUF, ChannelReader::new(rx));
        parse(&mut reader)
    });
    let fed = feed(&mut body, tx, limit, deadline).await;
    // The sender is gone now: the parser sees EOF and ends, whatever the body did.
    let parsed = task.await;
    fed.map_err(StreamError::Body)?;
    match parsed {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StreamError::Parse(e)),
        Err(e) => Err(StreamError::Task(e)),
    }
}

async fn feed(
    body: &mut Body,
    tx: mpsc::Sender<Bytes>,
    limit: u64,
    deadline: Instant,
) -> Result<(), BodyError> {
    let mut total = 0u64;
    while let Some(chunk) = next_chunk(body, deadline).await? {
        total += chunk.len() as u64;
        if total > limit {
            return Err(BodyError::TooLarge { limit });
        }
        if tx.send(chunk).await.is_err() {
            // The parser stopped early: it failed, and says why.
            return Ok(());
        }
    }
    Ok(())
}

/// Blocking [`Read`] over chunks from a channel; EOF when the sender is dropped.
/// Only for use on a blocking thread (`spawn_blocking` or a plain thread).
pub(crate) struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl ChannelReader {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn chunked(parts: Vec<&'static [u8]>) -> Body {
        let stream = futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| Ok::<_, io::Error>(Bytes::from_static(p))),
        );
        Body::from_stream(stream)
    }

    #[test]
    fn channel_reader_reassembles_chunks() {
        let (tx, rx) = mpsc::channel(2);
        let t = std::thread::spawn(move || {
            let mut s = String::new();
            ChannelReader::new(rx).read_to_string(&mut s).unwrap();
            s
        });
        for p in ["ab", "", "c", "def"] {
            tx.blocking_send(Bytes::from_static(p.as_bytes())).unwrap();
        }
        drop(tx);
        assert_eq!(t.join().unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn read_all_enforces_limit() {
        let b = read_all(chunked(vec![b"12", b"34"]), 4, deadline()).await;
        assert_eq!(b.unwrap(), Bytes::from_static(b"1234"));
        let b = read_all(chunked(vec![b"12", b"345"]), 4, deadline()).await;
        assert!(matches!(b, Err(BodyError::TooLarge { limit: 4 })));
    }

    #[tokio::test]
    async fn streaming_parse_and_limit() {
        let parse = |r: &mut dyn BufRead| serde_json::from_reader::<_, Vec<u32>>(r);
        let v = parse_streaming(chunked(vec![b"[1,", b"2", b",3]"]), 100, deadline(), parse).await;
        assert_eq!(v.unwrap(), vec![1, 2, 3]);

        let v = parse_streaming(chunked(vec![b"[1,", b"2,3]"]), 5, deadline(), parse).await;
        assert!(matches!(
            v,
            Err(StreamError::Body(BodyError::TooLarge { limit: 5 }))
        ));

        let v = parse_streaming(chunked(vec![b"[1,", b"x]"]), 100, deadline(), parse).await;
        assert!(matches!(v, Err(StreamError::Parse(_))));
    }

    #[tokio::test]
    async fn streaming_times_out() {
        // Real time: a paused clock does not auto-advance while the blocking parser waits.
        let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"[1,"))).await.unwrap();
        let body = Body::from_stream(tokio_stream_from(rx));
        let parse = |r: &mut dyn BufRead| serde_json::from_reader::<_, Vec<u32>>(r);
        let v = parse_streaming(body, 100, Instant::now() + Duration::from_millis(50), parse).await;
        assert!(matches!(v, Err(StreamError::Body(BodyError::Timeout))));
        drop(tx);
    }

    /// A stream over an mpsc receiver (tokio-stream is not a dependency).
    fn tokio_stream_from<T: Send + 'static>(
        rx: mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + 'static {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
    }
}
