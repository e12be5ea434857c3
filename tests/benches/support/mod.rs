//! What the `intake` and `e2e` benches share: an MTA's side of the milter protocol, a
//! keep-alive HTTP/1.1 client for the Stalwart endpoints, user registration, per-thread CPU
//! from /proc and latency formatting.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use mailbell::users::{ImportMode, UserStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for any one reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory under `MAILBELL_BENCH_DIR` (default: the system temp dir).
pub fn bench_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(match std::env::var_os("MAILBELL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    })
}

pub use mailbell_tests::cpu::load_average;

/// Quiets the link client's "agent unreachable" warnings unless RUST_LOG says otherwise.
pub fn default_log_filter() {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn,mailbell_link::net=error");
    }
}

/// The disk as the stores see it right now: `write` of 4 KiB appended plus `fsync`, 50 times
/// in `dir`; "p50 x  p99 y  max z ms".
pub fn fsync_probe(dir: &std::path::Path) -> String {
    let Some(samples) = mailbell_tests::disk::fsync_samples(dir, 50) else {
        return "unknown".into();
    };
    let mut h = histogram();
    for t in samples {
        record(&mut h, t);
    }
    quantiles(&h, &[0.5, 0.99, 1.0])
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---- users ---------------------------------------------------------------------------------

/// The address of registered user `i`.
pub fn user_addr(i: usize) -> String {
    format!("u{i:05}@example.com")
}

/// Registers users `0..n` (notices on, a distinct phone each, English, the daemon's rate limit)
/// through the CSV import, 500 per sled transaction. Blocking.
pub fn register_users(users: &UserStore, n: usize) -> anyhow::Result<()> {
    let mut csv = String::with_capacity(n * 48 + 64);
    csv.push_str("address,phone,language\n");
    for i in 0..n {
        csv.push_str(&format!("{},+86139{:08},en\n", user_addr(i), i));
    }
    let report = users.import_csv(csv.as_bytes(), ImportMode::Upsert)?;
    ensure!(
        report.failed == 0 && users.len() >= n,
        "user import failed: {:?}",
        report.errors.first()
    );
    Ok(())
}

// ---- latency -------------------------------------------------------------------------------

/// A latency histogram in microseconds, 1 µs to 10 min.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// "p50 0.61  p99 1.90  p99.9 3.20  max 7.10 ms"
pub fn quantiles(h: &Histogram<u64>, qs: &[f64]) -> String {
    let mut s = String::new();
    for q in qs {
        let label = if *q >= 1.0 {
            "max".to_string()
        } else {
            format!("p{}", trim_float(q * 100.0))
        };
        let v = if *q >= 1.0 {
            h.max()
        } else {
            h.value_at_quantile(*q)
        };
        s.push_str(&format!("{label} {:.2}  ", ms(v)));
    }
    s.push_str("ms");
    s
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// 12345.6 -> "12,346"
pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.abs().to_string();
    let out = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect::<Vec<_>>()
        .join(",");
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

// ---- CPU from /proc --------------------------------------------------------------------------

/// Clock ticks per second of /proc (USER_HZ; 100 on every Linux this runs on).
pub const TICKS: f64 = 100.0;

/// CPU seconds per thread name between two snapshots, largest first. Threads that ended in
/// between are missing (their time shows in the process total only).
pub fn cpu_by_name(
    before: &HashMap<(u32, String), u64>,
    after: &HashMap<(u32, String), u64>,
) -> Vec<(String, f64)> {
    let mut by: HashMap<String, u64> = HashMap::new();
    for ((tid, name), t1) in after {
        let t0 = before.get(&(*tid, name.clone())).copied().unwrap_or(0);
        *by.entry(name.clone()).or_default() += t1.saturating_sub(t0);
    }
    let mut v: Vec<(String, f64)> = by
        .into_iter()
        .filter(|(_, t)| *t > 0)
        .map(|(n, t)| (n, t as f64 / TICKS))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

pub fn format_cpu(v: &[(String, f64)]) -> String {
    v.iter()
        .map(|(n, s)| format!("{n} {s:.2}s"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- milter: the MTA's side ------------------------------------------------------------------

const SMFIP_NR_CONN: u32 = 0x1000;
const SMFIP_NR_HELO: u32 = 0x2000;
const SMFIP_NR_MAIL: u32 = 0x4000;
const SMFIP_NR_RCPT: u32 = 0x8000;
const SMFIP_NR_DATA: u32 = 0x10000;
const SMFIP_NR_UNKN: u32 = 0x20000;
const SMFIP_NR_EOH: u32 = 0x40000;
const SMFIP_NR_BODY: u32 = 0x80000;
const SMFIP_NR_HDR: u32 = 0x80;
const SMFIP_NOCONNECT: u32 = 0x1;
const SMFIP_NOHELO: u32 = 0x2;
const SMFIP_NOMAIL: u32 = 0x4;
const SMFIP_NORCPT: u32 = 0x8;
const SMFIP_NOHDRS: u32 = 0x20;
const SMFIP_NOEOH: u32 = 0x40;
const SMFIP_NOBODY: u32 = 0x10;
const SMFIP_NODATA: u32 = 0x200;
/// What we offer, like Postfix 3 with `milter_protocol = 6`: every "no such stage" and "no
/// reply" option (not SKIP, RCPT_REJ or HDR_LEADSPC, which change what is sent).
const OFFERED_OPTS: u32 = 0x0F_F3FF;
/// Every action (the milter asks for none).
const OFFERED_ACTIONS: u32 = 0x1FF;
/// Largest body chunk, as Postfix sends them.
const MAX_CHUNK: usize = 65_535;

fn packet(out: &mut Vec<u8>, cmd: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(cmd);
    out.extend_from_slice(payload);
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// One message as the MTA hands it to the milter.
pub struct MilterMessage<'a> {
    pub queue_id: &'a str,
    pub from: &'a str,
    pub rcpts: &'a [String],
    pub headers: &'a [(&'a str, String)],
    pub body: &'a [u8],
}

/// How one message went.
pub struct MilterOutcome {
    /// The end-of-message reply: b'a' accept, b't' tempfail, b'y' reply code, ...
    pub reply: u8,
    /// When the first byte of MAIL was about to be written.
    pub started: Instant,
    /// When the end-of-message packet had been written.
    pub eom_sent: Instant,
    /// When the end-of-message reply had been read.
    pub done: Instant,
}

/// A milter connection from the MTA's side: option negotiation, connect and HELO once, then
/// any number of mail transactions. Commands the milter asked not to answer are written
/// back to back; where it wants a reply we wait for it, like Postfix.
pub struct MilterClient {
    stream: TcpStream,
    opts: u32,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

impl MilterClient {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.context("milter connect")?;
        stream.set_nodelay(true)?;
        let mut c = MilterClient {
            stream,
            opts: 0,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::with_capacity(8192),
        };
        let mut p = Vec::new();
        p.extend_from_slice(&6u32.to_be_bytes());
        p.extend_from_slice(&OFFERED_ACTIONS.to_be_bytes());
        p.extend_from_slice(&OFFERED_OPTS.to_be_bytes());
        let mut out = Vec::new();
        packet(&mut out, b'O', &p);
        c.stream.write_all(&out).await?;
        let (cmd, payload) = c.read_reply().await?;
        ensure!(
            cmd == b'O' && payload.len() >= 12,
            "bad option negotiation reply {cmd:#04x}"
        );
        c.opts = u32::from_be_bytes([payload[8], payload[9], payload[10], payload[11]]);
        if c.opts & SMFIP_NOCONNECT == 0 {
            let mut conn = Vec::new();
            cstr(&mut conn, "mx.remote.example");
            conn.push(b'4');
            conn.extend_from_slice(&40000u16.to_be_bytes());
            cstr(&mut conn, "203.0.113.9");
            c.command(b'C', &conn).await?;
        }
        if c.opts & SMFIP_NOHELO == 0 {
            let mut helo = Vec::new();
            cstr(&mut helo, "mx.remote.example");
            c.command(b'H', &helo).await?;
        }
        c.flush().await?;
        Ok(c)
    }

    /// Whether the milter answers this command under the negotiated options.
    fn answers(&self, cmd: u8) -> bool {
        let nr = match cmd {
            b'C' => SMFIP_NR_CONN,
            b'H' => SMFIP_NR_HELO,
            b'M' => SMFIP_NR_MAIL,
            b'R' => SMFIP_NR_RCPT,
            b'T' => SMFIP_NR_DATA,
            b'L' => SMFIP_NR_HDR,
            b'N' => SMFIP_NR_EOH,
            b'B' => SMFIP_NR_BODY,
            b'U' => SMFIP_NR_UNKN,
            b'E' => return true,
            _ => return false,
        };
        self.opts & nr == 0
    }

    /// Queues a command; if the milter answers it, writes everything queued and checks that
    /// the answer is "continue".
    async fn command(&mut self, cmd: u8, payload: &[u8]) -> anyhow::Result<()> {
        packet(&mut self.wbuf, cmd, payload);
        if self.answers(cmd) {
            self.flush().await?;
            let (r, _) = self.read_reply().await?;
            ensure!(
                r == b'c',
                "milter answered {:?} to {:?}",
                char::from(r),
                char::from(cmd)
            );
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next reply packet, skipping "progress" packets.
    async fn read_reply(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            while self.rbuf.len() < 5
                || self.rbuf.len()
                    < 4 + u32::from_be_bytes([
                        self.rbuf[0],
                        self.rbuf[1],
                        self.rbuf[2],
                        self.rbuf[3],
                    ]) as usize
            {
                if self.rbuf.len() >= 4 {
                    let len = u32::from_be_bytes([
                        self.rbuf[0],
                        self.rbuf[1],
                        self.rbuf[2],
                        self.rbuf[3],
                    ]);
                    ensure!(
                        (1..=1 << 20).contains(&len),
                        "bad milter reply length {len}"
                    );
                }
                let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.rbuf))
                    .await
                    .context("milter reply timed out")??;
                if n == 0 {
                    bail!("milter closed the connection");
                }
            }
            let len = u32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]])
                as usize;
            let cmd = self.rbuf[4];
            let payload = self.rbuf[5..4 + len].to_vec();
            self.rbuf.drain(..4 + len);
            if cmd != b'p' {
                return Ok((cmd, payload));
            }
        }
    }

    /// One mail transaction, MAIL to end of message; the end of message goes in a write of
    /// its own, so `eom_sent` is the moment the MTA has handed over the last byte.
    pub async fn send(&mut self, m: &MilterMessage<'_>) -> anyhow::Result<MilterOutcome> {
        let started = Instant::now();
        let mut p = Vec::with_capacity(256);
        if self.opts & SMFIP_NOMAIL == 0 {
            cstr(&mut p, &format!("<{}>", m.from));
            self.command(b'M', &p).await?;
        }
        if self.opts & SMFIP_NORCPT == 0 {
            for r in m.rcpts {
                p.clear();
                cstr(&mut p, &format!("<{r}>"));
                self.command(b'R', &p).await?;
            }
        }
        if self.opts & SMFIP_NODATA == 0 {
            self.command(b'T', &[]).await?;
        }
        if self.opts & SMFIP_NOHDRS == 0 {
            for (n, v) in m.headers {
                p.clear();
                cstr(&mut p, n);
                cstr(&mut p, v);
                self.command(b'L', &p).await?;
            }
        }
        if self.opts & SMFIP_NOEOH == 0 {
            self.command(b'N', &[]).await?;
        }
        if self.opts & SMFIP_NOBODY == 0 {
            for chunk in m.body.chunks(MAX_CHUNK) {
                self.command(b'B', chunk).await?;
            }
        }
        self.flush().await?;
        // Macros for end of message (the queue id), then end of message, in one write.
        p.clear();
        p.push(b'E');
        cstr(&mut p, "i");
        cstr(&mut p, m.queue_id);
        packet(&mut self.wbuf, b'D', &p);
        packet(&mut self.wbuf, b'E', &[]);
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        let eom_sent = Instant::now();
        let (reply, _) = self.read_reply().await?;
        let done = Instant::now();
        Ok(MilterOutcome {
            reply,
            started,
            eom_sent,
            done,
        })
    }

    /// Says goodbye (QUIT).
    pub async fn quit(mut self) {
        let mut out = Vec::new();
        packet(&mut out, b'Q', &[]);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}

// ---- HTTP/1.1 keep-alive client ----------------------------------------------------------------

/// An answer and when it came.
pub struct HttpReply {
    pub status: u16,
    pub body: Vec<u8>,
    /// When the first byte of the request was about to be written.
    pub started: Instant,
    /// When the last byte of the request had been written.
    pub sent: Instant,
    /// When the whole answer had been read.
    pub done: Instant,
}

/// One keep-alive HTTP/1.1 connection (reconnects if the server closes it).
pub struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut c = HttpConn {
            addr,
            stream: None,
            rbuf: Vec::with_capacity(4096),
            wbuf: Vec::new(),
        };
        c.open().await?;
        Ok(c)
    }

    async fn open(&mut self) -> anyhow::Result<()> {
        let s = TcpStream::connect(self.addr)
            .await
            .context("HTTP connect")?;
        s.set_nodelay(true)?;
        self.stream = Some(s);
        self.rbuf.clear();
        Ok(())
    }

    /// POSTs `body` (JSON) with extra header lines (each ending in CRLF).
    pub async fn post(
        &mut self,
        path: &str,
        extra: &str,
        body: &[u8],
    ) -> anyhow::Result<HttpReply> {
        if self.stream.is_none() {
            self.open().await?;
        }
        self.wbuf.clear();
        self.wbuf.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n",
                self.addr,
                body.len()
            )
            .as_bytes(),
        );
        self.wbuf.extend_from_slice(body);
        let started = Instant::now();
        let stream = self.stream.as_mut().context("not connected")?;
        stream.write_all(&self.wbuf).await?;
        let sent = Instant::now();
        let (status, body, close) =
            tokio::time::timeout(IO_TIMEOUT, read_response(stream, &mut self.rbuf))
                .await
                .context("HTTP answer timed out")??;
        let done = Instant::now();
        if close {
            self.stream = None;
        }
        Ok(HttpReply {
            status,
            body,
            started,
            sent,
            done,
        })
    }
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response: (status, body, whether the server closes the connection).
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>, bool)> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        ensure!(buf.len() < 64 * 1024, "HTTP head too long");
        if s.read_buf(buf).await? == 0 {
            bail!("HTTP server closed the connection");
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("HTTP head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    for l in lines {
        let Some((n, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if n.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        } else if n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    buf.drain(..head_end + 4);
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if s.read_buf(buf).await? == 0 {
                    bail!("HTTP server closed mid-body");
                }
            };
            let size_text = std::str::from_utf8(&buf[..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            while buf.len() < line_end + 2 + size + 2 {
                if s.read_buf(buf).await? == 0 {
                    bail!("HTTP server closed mid-body");
                }
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let n = length.unwrap_or(0);
        while buf.len() < n {
            if s.read_buf(buf).await? == 0 {
                bail!("HTTP server closed mid-body");
            }
        }
        buf.drain(..n).collect()
    };
    Ok((status, body, close))
}

// ---- message content -------------------------------------------------------------------------

/// A plain-text body of about `bytes` bytes, CRLF lines of 76 characters.
pub fn body_text(bytes: usize) -> String {
    let line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\r\n";
    let mut s = String::with_capacity(bytes + line.len());
    while s.len() + line.len() <= bytes.max(line.len()) {
        s.push_str(line);
    }
    s
}

/// `s` as the inside of a JSON string.
pub fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\r' => o.push_str("\\r"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// A Stalwart data-stage hook request (same shape as `system::hook_data_request`, written
/// by hand so the client spends little CPU on it). `body_json` is already JSON-escaped.
pub fn hook_request(
    queue_id: u64,
    from: &str,
    rcpts: &[String],
    headers: &[(&str, String)],
    body_json: &str,
    size: usize,
) -> Vec<u8> {
    let mut s = String::with_capacity(body_json.len() + 1024);
    s.push_str(&format!(
        "{{\"context\":{{\"stage\":\"data\",\"client\":{{\"ip\":\"203.0.113.9\",\"port\":40000,\"ptr\":null,\
         \"helo\":\"mx.remote.example\",\"activeConnections\":1}},\"server\":{{\"name\":\"Stalwart v0.16.0\",\
         \"port\":25,\"ip\":\"127.0.0.1\"}},\"queue\":{{\"id\":\"{queue_id:x}\"}},\"protocol\":{{\"version\":1}}}},\
         \"envelope\":{{\"from\":{{\"address\":\"{from}\"}},\"to\":["
    ));
    for (i, r) in rcpts.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("{{\"address\":\"{r}\"}}"));
    }
    s.push_str("]},\"message\":{\"headers\":[");
    for (i, (n, v)) in headers.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!("[\"{n}\",\" {}\\r\\n\"]", json_escape(v)));
    }
    s.push_str(&format!(
        "],\"contents\":\"{body_json}\",\"size\":{size}}}}}"
    ));
    s.into_bytes()
}

/// Header fields of a typical message (header section about 300 bytes).
pub fn headers(from: &str, to: &str, subject: &str, n: u64) -> Vec<(&'static str, String)> {
    vec![
        ("Received", "from mx.remote.example (mx.remote.example [203.0.113.9]) by mx.example.com with ESMTPS".into()),
        ("From", format!("Zhang Wei <{from}>")),
        ("To", to.to_string()),
        ("Subject", subject.to_string()),
        ("Date", "Sun, 22 Nov 2026 10:00:00 +0000".into()),
        ("Message-ID", format!("<bench-{n}@remote.example>")),
        ("MIME-Version", "1.0".into()),
        ("Content-Type", "text/plain; charset=utf-8".into()),
    ]
}

/// Bytes of a header section as sent over SMTP ("Name: value\r\n" each, plus the blank line).
pub fn header_bytes(h: &[(&str, String)]) -> usize {
    h.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>() + 2
}
