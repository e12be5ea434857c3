//! A DNS server on loopback that answers TXT questions from a fixed table (and nothing else):
//! the SPF records a test needs, with no network. UDP only; every other question gets an
//! empty NOERROR answer, a name not in the table NXDOMAIN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

const TXT: u16 = 16;

/// The running server; it stops when dropped.
pub struct FakeDns {
    pub addr: SocketAddr,
    /// Questions answered.
    pub queries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a server answering `records` (name without the final dot, lower case → TXT text).
pub async fn start(records: &[(&str, &str)]) -> anyhow::Result<FakeDns> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    let table: HashMap<String, String> = records
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
        .collect();
    let queries = Arc::new(AtomicU64::new(0));
    let q = queries.clone();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if let Some(reply) = answer(&buf[..n], &table) {
                q.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&reply, peer).await;
            }
        }
    });
    Ok(FakeDns {
        addr,
        queries,
        task,
    })
}

/// The reply to one query, or `None` for what is not a query.
fn answer(q: &[u8], table: &HashMap<String, String>) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels, type, class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = q.get(12..i + 4)?;
    let name = labels.join(".");
    let found = table.get(&name);
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[0..2]);
    // QR, opcode 0, RD copied, RA; RCODE NXDOMAIN when the name is unknown.
    r.push(0x80 | (q[2] & 0x01));
    r.push(if found.is_some() { 0x80 } else { 0x83 });
    let answers: u16 = u16::from(found.is_some() && qtype == TXT);
    for v in [1u16, answers, 0, 0] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    r.extend_from_slice(question);
    if let (Some(text), 1) = (found, answers) {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&TXT.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&60u32.to_be_bytes());
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        let rdlen: usize = chunks.iter().map(|c| c.len() + 1).sum();
        r.extend_from_slice(&u16::try_from(rdlen).ok()?.to_be_bytes());
        for c in chunks {
            r.push(u8::try_from(c.len()).ok()?);
            r.extend_from_slice(c);
        }
    }
    Some(r)
}
