//! How fast the retrieval proxy's protocol cores follow the backend stream after login: POP3
//! RETR replies and IMAP FETCH responses of 2,000 messages of 51 KB (the issue 11 workload), fed
//! in 16 KiB chunks as TLS records arrive, one command per message (RETR n, UID FETCH n). This is the parsing cost alone, no sockets or TLS; the
//! end-to-end proxy benchmark belongs with the proxy shell.
//!
//! Run: `cargo bench -p mailbell --bench retrieval_scan`. Prints figures; exits non-zero only
//! when the metered bytes disagree with the definition, never because of speed.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mailbell::retrieval::imap::{ImapConfig, ImapSession, ServerEvent as ImapEvent};
use mailbell::retrieval::pop3::{retr_bytes, Pop3Config, Pop3Session, ServerEvent as PopEvent};

const MESSAGES: usize = 2000;
const MESSAGE_SIZE: usize = 51 * 1024;
const CHUNK: usize = 16 * 1024;
const ROUNDS: usize = 5;

/// A message of about MESSAGE_SIZE bytes in 76-character CRLF lines; every 40th line starts with
/// a dot (dot-stuffed on the POP3 wire).
fn message() -> Vec<u8> {
    let mut m = b"From: a@example.org\r\nSubject: bench\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < MESSAGE_SIZE {
        if i % 40 == 0 {
            m.push(b'.');
        }
        m.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, 76));
        m.extend_from_slice(b"\r\n");
        i += 1;
    }
    m
}

/// One command and its reply per message.
type Exchange = (Vec<u8>, Vec<u8>);

fn pop3_stream(msg: &[u8]) -> (Vec<Exchange>, u64) {
    let mut body = Vec::new();
    for line in msg.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b".") {
            body.push(b'.');
        }
        body.extend_from_slice(line);
    }
    let mut reply = format!("+OK {} octets\r\n", msg.len()).into_bytes();
    reply.extend_from_slice(&body);
    reply.extend_from_slice(b".\r\n");
    let want = retr_bytes(&reply).unwrap_or(0) * MESSAGES as u64;
    let exchanges = (1..=MESSAGES)
        .map(|n| (format!("RETR {n}\r\n").into_bytes(), reply.clone()))
        .collect();
    (exchanges, want)
}

fn imap_stream(msg: &[u8]) -> (Vec<Exchange>, u64) {
    let exchanges = (1..=MESSAGES)
        .map(|n| {
            let command = format!("f{n} UID FETCH {n} BODY.PEEK[]\r\n").into_bytes();
            let mut reply =
                format!("* {n} FETCH (UID {n} BODY[] {{{}}}\r\n", msg.len()).into_bytes();
            reply.extend_from_slice(msg);
            reply.extend_from_slice(format!(")\r\nf{n} OK Fetch completed.\r\n").as_bytes());
            (command, reply)
        })
        .collect();
    (exchanges, (msg.len() * MESSAGES) as u64)
}

fn report(name: &str, bytes: usize, times: &mut [Duration]) {
    times.sort();
    let best = times[0].as_secs_f64();
    let median = times[times.len() / 2].as_secs_f64();
    println!(
        "{name:<6} {:>8.0} MB/s best  {:>8.0} MB/s median  {:>6.2} µs/message  ({} MB in {CHUNK}-byte chunks)",
        bytes as f64 / best / 1e6,
        bytes as f64 / median / 1e6,
        median * 1e6 / MESSAGES as f64,
        bytes / 1_000_000,
    );
}

fn main() -> ExitCode {
    let msg = message();
    let mut ok = true;

    let (exchanges, want) = pop3_stream(&msg);
    let total: usize = exchanges.iter().map(|e| e.1.len()).sum();
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let mut s = Pop3Session::new(Pop3Config {
            tls: true,
            ..Pop3Config::default()
        });
        s.server(b"+OK hi\r\n");
        s.client(b"USER u\r\nPASS p\r\n");
        s.server(b"+OK\r\n+OK\r\n");
        let mut metered = 0u64;
        let start = Instant::now();
        for (command, reply) in &exchanges {
            s.client(command);
            for chunk in reply.chunks(CHUNK) {
                for event in s.server(chunk) {
                    if let PopEvent::Retrieved(r) = event {
                        metered += r.bytes;
                    }
                }
            }
        }
        times.push(start.elapsed());
        if metered != want {
            eprintln!("pop3: metered {metered} bytes, the definition gives {want}");
            ok = false;
        }
    }
    report("pop3", total, &mut times);

    let (exchanges, want) = imap_stream(&msg);
    let total: usize = exchanges.iter().map(|e| e.1.len()).sum();
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let mut s = ImapSession::new(ImapConfig {
            tls: true,
            ..ImapConfig::default()
        });
        s.server(b"* OK hi\r\n");
        s.client(b"a LOGIN u p\r\n");
        s.server(b"a OK in\r\n");
        let mut metered = 0u64;
        let start = Instant::now();
        for (command, reply) in &exchanges {
            s.client(command);
            for chunk in reply.chunks(CHUNK) {
                for event in s.server(chunk) {
                    if let ImapEvent::Fetched(f) = event {
                        metered += f.sections.iter().map(|s| s.bytes).sum::<u64>();
                    }
                }
            }
        }
        times.push(start.elapsed());
        if metered != want {
            eprintln!("imap: metered {metered} bytes, expected {want}");
            ok = false;
        }
    }
    report("imap", total, &mut times);

    println!(
        "session structs: pop3 {} bytes, imap {} bytes (line buffers are freed after each line)",
        std::mem::size_of::<Pop3Session>(),
        std::mem::size_of::<ImapSession>()
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
