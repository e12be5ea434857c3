//! The relay's buffers: a bounded output queue per direction ([`Outbox`]) and a read buffer
//! that exists only while data flows ([`Reader`]).
//!
//! The session loop in [`super::server`] polls both reads and both pending writes at once, as
//! tokio's `copy_bidirectional` does: a side is read only while the queue its bytes go to has
//! room, so the backend's next chunk is read while the previous one is still being written to
//! the client, and a slow reader holds at most [`OUTBOX_LIMIT`] bytes (plus one read) in the
//! proxy. An idle session holds no buffer at all: a read that finds nothing frees its buffer,
//! and a written chunk is freed.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes an [`Outbox`] may hold before the side feeding it is no longer read.
pub const OUTBOX_LIMIT: usize = 128 * 1024;

/// Bytes waiting to be written to one side, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already written.
    front: usize,
    /// Bytes queued and not yet written.
    queued: usize,
    /// Written since the last flush.
    dirty: bool,
}

impl Outbox {
    /// Queues `b` behind what is already queued (an empty chunk is dropped).
    pub fn push(&mut self, b: Vec<u8>) {
        if !b.is_empty() {
            self.queued += b.len();
            self.chunks.push_back(b);
        }
    }

    /// Whether the side feeding this queue may be read.
    pub fn has_room(&self) -> bool {
        self.queued < OUTBOX_LIMIT
    }

    /// Nothing queued and everything written flushed.
    pub fn is_idle(&self) -> bool {
        self.chunks.is_empty() && !self.dirty
    }

    /// Writes and flushes as much as `w` takes now; returns the bytes written (the waker is
    /// registered when `w` is not ready and something is left).
    pub fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> io::Result<usize> {
        let mut wrote = 0;
        while let Some(chunk) = self.chunks.front() {
            let rest = chunk.get(self.front..).unwrap_or_default();
            match Pin::new(&mut *w).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    wrote += n;
                    self.queued -= n;
                    self.front += n;
                    self.dirty = true;
                    if self.front >= chunk.len() {
                        self.chunks.pop_front();
                        self.front = 0;
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(wrote),
            }
        }
        if self.dirty {
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.dirty = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(wrote)
    }

    /// Writes everything queued and flushes.
    pub async fn drain<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        std::future::poll_fn(|cx| match self.poll_drain(w, cx) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(_) if self.is_idle() => Poll::Ready(Ok(())),
            // Progress without the end: poll again at once (the writer may take more).
            Ok(n) if n > 0 => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Ok(_) => Poll::Pending,
        })
        .await
    }
}

/// One side's read buffer of `size` bytes, allocated for a read and freed when a read finds
/// nothing to read, so that an idle session holds none.
#[derive(Debug)]
pub struct Reader {
    size: usize,
    spare: Option<Vec<u8>>,
}

impl Reader {
    pub fn new(size: usize) -> Reader {
        Reader { size, spare: None }
    }

    /// Reads into a buffer of this reader's size and hands it over holding exactly the bytes
    /// read (empty at end of stream). Give it back with [`Reader::recycle`] for the next read.
    pub fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Vec<u8>>> {
        let mut buf = self.spare.take().unwrap_or_default();
        buf.resize(self.size, 0);
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                buf.truncate(n);
                Poll::Ready(Ok(buf))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Nothing to read: the buffer goes (`buf` is dropped here).
            Poll::Pending => Poll::Pending,
        }
    }

    /// Keeps `buf` for the next read (it is freed when that read finds nothing).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= self.size {
            self.spare = Some(buf);
        }
    }

    /// Whether this reader holds a buffer now.
    #[cfg(test)]
    pub fn holds_buffer(&self) -> bool {
        self.spare.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A writer that takes at most `step` bytes per call and is not ready every other call.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
        flushes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.calls % 2 == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_outbox_writes_its_chunks_in_order_through_partial_writes_and_flushes() {
        let mut out = Outbox::default();
        let chunks: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1 + usize::from(i) * 7]).collect();
        for c in &chunks {
            out.push(c.clone());
        }
        out.push(Vec::new());
        let mut w = Trickle {
            out: Vec::new(),
            step: 5,
            calls: 0,
            flushes: 0,
        };
        out.drain(&mut w).await.unwrap();
        assert_eq!(w.out, chunks.concat());
        assert!(out.is_idle());
        assert!(w.flushes >= 1);
    }

    #[test]
    fn an_outbox_has_room_until_its_limit() {
        let mut out = Outbox::default();
        assert!(out.has_room());
        out.push(vec![0; OUTBOX_LIMIT - 1]);
        assert!(out.has_room());
        out.push(vec![0; 1]);
        assert!(!out.has_room());
    }

    #[tokio::test]
    async fn a_write_error_is_returned() {
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        let mut a = a;
        let mut out = Outbox::default();
        out.push(b"lost".to_vec());
        assert!(out.drain(&mut a).await.is_err());
    }

    #[tokio::test]
    async fn a_reader_holds_a_buffer_only_between_reads_that_find_data() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut r = Reader::new(16 * 1024);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Nothing to read: no buffer kept.
        assert!(r.poll_read(&mut b, &mut cx).is_pending());
        assert!(!r.holds_buffer());
        tokio::io::AsyncWriteExt::write_all(&mut a, b"hello")
            .await
            .unwrap();
        let Poll::Ready(Ok(got)) = r.poll_read(&mut b, &mut cx) else {
            panic!("no data")
        };
        assert_eq!(got, b"hello");
        r.recycle(got);
        assert!(r.holds_buffer());
        assert!(r.poll_read(&mut b, &mut cx).is_pending());
        assert!(!r.holds_buffer());
        drop(a);
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
