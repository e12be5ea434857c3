//! A milter that does nothing: it negotiates what mailbell's milter negotiates (the same
//! stages skipped, no reply before end of message) and accepts every message, with a blocking
//! thread per connection in the style of libmilter. `bench_mta --null-milter` puts it where
//! mailbell's milter would be, so the MTA's rate with it is the most any milter can keep: the
//! MTA's own cost of calling one (a connection per SMTP session, every packet sent), plus
//! reading the packets and nothing else.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

// Protocol option bits (libmilter's mfdef.h).
const NOEOH: u32 = 0x40;
const NR_HDR: u32 = 0x80;
const NOUNKNOWN: u32 = 0x100;
const NODATA: u32 = 0x200;
const NR_CONN: u32 = 0x1000;
const NR_HELO: u32 = 0x2000;
const NR_MAIL: u32 = 0x4000;
const NR_RCPT: u32 = 0x8000;
const NR_DATA: u32 = 0x1_0000;
const NR_UNKN: u32 = 0x2_0000;
const NR_EOH: u32 = 0x4_0000;
const NR_BODY: u32 = 0x8_0000;

/// What mailbell's milter asks for (`wanted_opts` in plugin/src/mta/milter.rs).
const WANTED: u32 = NODATA
    | NOEOH
    | NOUNKNOWN
    | NR_CONN
    | NR_HELO
    | NR_MAIL
    | NR_RCPT
    | NR_DATA
    | NR_HDR
    | NR_EOH
    | NR_BODY
    | NR_UNKN;

/// Largest packet accepted (libmilter's default is 64 KiB of body per chunk, plus headroom).
const MAX_PACKET: usize = 1 << 20;

/// The null milter, listening until dropped.
pub struct NullMilter {
    stop: Arc<AtomicBool>,
    path: std::path::PathBuf,
    /// Messages that reached end of message.
    pub messages: Arc<AtomicU64>,
}

impl NullMilter {
    /// Listens on a Unix-domain socket at `path` (mode 0666, so that Postfix's unprivileged
    /// daemons reach it).
    pub fn start(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let stop = Arc::new(AtomicBool::new(false));
        let messages = Arc::new(AtomicU64::new(0));
        let (stop2, count) = (stop.clone(), messages.clone());
        std::thread::Builder::new()
            .name("null-milter".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else {
                        // Out of descriptors, say: back off instead of spinning.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    };
                    let count = count.clone();
                    let _ = std::thread::Builder::new()
                        .name("null-milter-conn".into())
                        .spawn(move || {
                            let _ = session(conn, &count);
                        });
                }
            })?;
        Ok(Self {
            stop,
            path: path.to_owned(),
            messages,
        })
    }
}

impl Drop for NullMilter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: answers option negotiation and end of message, and every other stage the
/// MTA would not let go unanswered; ends at QUIT or EOF.
fn session(conn: UnixStream, messages: &AtomicU64) -> io::Result<()> {
    // A peer that stops talking does not keep its thread (Postfix's own idle limit is 300 s).
    conn.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let mut rd = BufReader::new(conn.try_clone()?);
    let mut wr = BufWriter::new(conn);
    let mut opts = 0u32;
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match rd.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "packet length"));
        }
        buf.resize(len, 0);
        rd.read_exact(&mut buf)?;
        let (cmd, data) = (buf[0], &buf[1..]);
        let noreply = |bit: u32| opts & bit != 0;
        let reply: Option<&[u8]> = match cmd {
            b'O' => {
                let offered = data
                    .get(8..12)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                opts = WANTED & offered;
                let mut out = Vec::with_capacity(17);
                out.extend_from_slice(&13u32.to_be_bytes());
                out.push(b'O');
                out.extend_from_slice(&6u32.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&opts.to_be_bytes());
                wr.write_all(&out)?;
                wr.flush()?;
                continue;
            }
            b'E' => {
                messages.fetch_add(1, Ordering::Relaxed);
                Some(b"a")
            }
            b'Q' => return Ok(()),
            b'D' | b'A' | b'K' => None,
            b'C' if noreply(NR_CONN) => None,
            b'H' if noreply(NR_HELO) => None,
            b'M' if noreply(NR_MAIL) => None,
            b'R' if noreply(NR_RCPT) => None,
            b'T' if noreply(NR_DATA) => None,
            b'L' if noreply(NR_HDR) => None,
            b'N' if noreply(NR_EOH) => None,
            b'B' if noreply(NR_BODY) => None,
            b'U' if noreply(NR_UNKN) => None,
            _ => Some(b"c"),
        };
        if let Some(r) = reply {
            wr.write_all(&1u32.to_be_bytes())?;
            wr.write_all(r)?;
            wr.flush()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(cmd: u8, data: &[u8]) -> Vec<u8> {
        let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
        p.push(cmd);
        p.extend_from_slice(data);
        p
    }

    fn read_packet(s: &mut UnixStream) -> (u8, Vec<u8>) {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        (body[0], body[1..].to_vec())
    }

    #[test]
    fn negotiates_what_it_is_offered_and_answers_only_where_it_must() {
        let dir = tempfile::tempdir().unwrap();
        let m = NullMilter::start(&dir.path().join("m.sock")).unwrap();
        let mut s = UnixStream::connect(dir.path().join("m.sock")).unwrap();
        // Offered: everything but the no-reply bit for headers.
        let offered = 0x001F_FFFF & !NR_HDR;
        let mut neg = 6u32.to_be_bytes().to_vec();
        neg.extend_from_slice(&0x1FFu32.to_be_bytes());
        neg.extend_from_slice(&offered.to_be_bytes());
        s.write_all(&packet(b'O', &neg)).unwrap();
        let (cmd, data) = read_packet(&mut s);
        assert_eq!(cmd, b'O');
        let got = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
        assert_eq!(got, WANTED & !NR_HDR);
        // No reply to the connect stage; a header must be answered; end of message accepts.
        s.write_all(&packet(b'C', b"host\0"))
            .and_then(|()| s.write_all(&packet(b'L', b"Subject\0x\0")))
            .unwrap();
        assert_eq!(read_packet(&mut s), (b'c', vec![]));
        s.write_all(&packet(b'E', b"")).unwrap();
        assert_eq!(read_packet(&mut s), (b'a', vec![]));
        assert_eq!(m.messages.load(Ordering::Relaxed), 1);
        s.write_all(&packet(b'Q', b"")).unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "closed after QUIT");
    }
}
