//! A simulated GSM modem that speaks AT on a real pseudo-terminal.
//!
//! [`SimModem::spawn`] opens a pty pair, makes it raw, and answers on the master side from a
//! std thread; [`SimModem::device_path`] is the slave (`/dev/pts/N`) that the driver, or an
//! agent in another process, opens like a USB modem. The sim keeps running while no one has the
//! slave open (the master then reads `EIO`: "no client yet"), so an agent can be killed and
//! restarted against the same path.
//!
//! What it answers (V.250 framing `<cr><lf>...<cr><lf>`, echo on until `ATE0`):
//!
//! ```text
//! AT, ATE0/ATE1, ATZ, ATI, AT+CMEE=n      OK (CMEE=0 turns +CME ERROR into ERROR)
//! AT+CMGF=0|1, AT+CSCS, AT+CMMS, AT+CNMI  OK
//! AT+CPIN?                                +CPIN: READY | SIM PIN | SIM PUK (3 wrong PINs)
//! AT+CPIN="<pin>"                         OK | +CME ERROR: 16 (wrong) | 12 (locked) | 3
//! AT+CREG?                                +CREG: 0,1 (0,2 while not registered)
//! AT+CSQ, +CGMI, +CGMM, +CGMR, +CGSN, +CIMI, +CSCA?, +CFUN, +CPMS, +COPS?
//! AT+CMGS=<n>                             <cr><lf>> , then hex up to ctrl-z (esc cancels);
//!                                         n must be octets - 1 - SMSC octets and the hex
//!                                         valid, else +CMS ERROR: 304; then
//!                                         <cr><lf>+CMGS: <mr><cr><lf><cr><lf>OK<cr><lf>
//! anything else                           ERROR
//! ```
//!
//! Faults ([`Fault`]) make it misbehave the way real modems do: error answers, silence, late
//! answers, URC storms, and the device vanishing. Each accepted PDU can be appended to a JSON
//! lines file (`{"t_ms":..,"tpdu_len":..,"hex":"..","mr":..}`, `t_ms` since the Unix epoch) so
//! another process can check what was sent.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::openpty;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::ttyname;

const CTRL_Z: u8 = 0x1a;
const ESC: u8 = 0x1b;
const MAX_INPUT: usize = 2048;
const MAX_OUTPUT: usize = 1 << 20;
const MAX_COMMANDS: usize = 10_000;
const PIN_TRIES: u8 = 3;
/// The longest nap of an idle simulated modem: how late it may notice a command.
const IDLE_SLEEP_MAX: Duration = Duration::from_millis(4);
/// URCs written per loop turn during a storm.
const STORM_BURST: usize = 16;
const STORM_URCS: &[&str] = &[
    "^RSSI:17",
    "+CMTI: \"SM\",1",
    "^BOOT:20,0,0,0,0",
    "RING",
    "^MODE:5,4",
    "+CDSI: \"SR\",2",
    "+CUSD: 0,\"Balance 5.00\",15",
];

/// How the simulated modem behaves.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How long the "SMSC" takes to accept a PDU (0 = answer at once).
    pub submit_delay: Duration,
    /// Append one JSON line per accepted PDU here, flushed at once.
    pub pdu_log: Option<PathBuf>,
    /// The SIM asks for this PIN (`+CPIN: SIM PIN`) until it is given.
    pub require_pin: Option<String>,
    /// Registered to the network (`+CREG: 0,1`); otherwise searching (`0,2`).
    pub registered: bool,
    /// Keep only the newest this many accepted PDUs for [`SimModem::received`] (`None`: all,
    /// for tests that count them). The agent's own simulator runs for as long as the agent,
    /// so it keeps a bounded number; the PDU log has every one.
    pub keep_received: Option<usize>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            submit_delay: Duration::ZERO,
            pdu_log: None,
            require_pin: None,
            registered: true,
            keep_received: None,
        }
    }
}

/// A PDU the simulated SMSC accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedPdu {
    /// The `<n>` of `AT+CMGS=<n>`.
    pub tpdu_len: usize,
    /// The PDU hex as written by the client.
    pub hex: String,
    /// The message reference answered.
    pub mr: u8,
    /// When it arrived.
    pub at: Instant,
}

/// A misbehaviour to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The next submit answers `+CMS ERROR: <n>` (queued: inject twice for two submits).
    CmsError(u16),
    /// The next submit answers `ERROR`.
    PlainError,
    /// Read (and log) every command, answer and do nothing, until [`SimModem::clear_faults`].
    Silence,
    /// Every submit answer comes this much later (on top of `submit_delay`), until cleared.
    Delay(Duration),
    /// Write this URC now.
    Urc(String),
    /// Write this many URCs, in bursts and in between answers (after the prompt too).
    UrcStorm(usize),
    /// Close the master: the device disappears for good.
    Hangup,
    /// From the `from`-th submit on (1-based, counting every PDU this modem has been given,
    /// the ones before the fault included), every submit misbehaves this way, until
    /// [`SimModem::clear_faults`]: a modem that breaks for good in the middle of a run.
    BrokenFrom { from: u64, how: Broken },
}

/// How a [`Fault::BrokenFrom`] modem answers a submit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Broken {
    /// `+CMS ERROR: <n>` at once (e.g. 500, "unknown error").
    Cms(u16),
    /// A plain `ERROR` at once.
    PlainError,
    /// No answer, and from then on silent to every command (as [`Fault::Silence`]): the
    /// modem behind the port died mid-submit.
    Silence,
    /// Line noise instead of an answer (no final result), while other commands are still
    /// answered.
    Garbage,
    /// The device disappears mid-submit (as [`Fault::Hangup`]).
    Vanish,
}

#[derive(Debug)]
enum SubmitFault {
    Cms(u16),
    Plain,
}

#[derive(Debug)]
struct Shared {
    received: Vec<ReceivedPdu>,
    /// Every PDU accepted since start, including those `keep_received` let go.
    accepted: u64,
    keep_received: Option<usize>,
    commands: Vec<String>,
    submit_faults: VecDeque<SubmitFault>,
    silence: bool,
    extra_delay: Duration,
    urcs: VecDeque<String>,
    storm: usize,
    hangup: bool,
    stop: bool,
    /// Submits to these digits answer `+CMS ERROR: <code>`.
    rejected: Option<(String, u16)>,
    registered: bool,
    broken: Option<(u64, Broken)>,
    /// PDUs given to this modem (ctrl-z seen with a well-formed PDU), accepted or not.
    submits: u64,
}

/// A simulated modem on a pseudo-terminal. Dropping it stops the modem and closes the master.
#[derive(Debug)]
pub struct SimModem {
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimModem {
    /// Opens a pty pair and starts answering on it.
    pub fn spawn(opts: SimOptions) -> io::Result<SimModem> {
        let pty = openpty(None, None)?;
        let mut termios = tcgetattr(&pty.slave)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &termios)?;
        let path = ttyname(&pty.slave)?;
        let flags = fcntl(pty.master.as_raw_fd(), FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(pty.master.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
        // Only clients hold the slave open, so the master sees EIO when the last one leaves.
        drop(pty.slave);
        let log = match &opts.pdu_log {
            Some(p) => Some(OpenOptions::new().create(true).append(true).open(p)?),
            None => None,
        };
        let shared = Arc::new(Mutex::new(Shared {
            received: Vec::new(),
            accepted: 0,
            keep_received: opts.keep_received,
            commands: Vec::new(),
            submit_faults: VecDeque::new(),
            silence: false,
            extra_delay: Duration::ZERO,
            urcs: VecDeque::new(),
            storm: 0,
            hangup: false,
            stop: false,
            rejected: None,
            registered: opts.registered,
            broken: None,
            submits: 0,
        }));
        let modem = SimThread {
            file: File::from(pty.master),
            shared: shared.clone(),
            log,
            opts,
            echo: true,
            silent: false,
            cmee: 0,
            pin_ok: false,
            pin_tries: PIN_TRIES,
            input: Vec::new(),
            backlog: Vec::new(),
            mode: Mode::Command,
            out: Vec::new(),
            scheduled: None,
            next_mr: 1,
            storm_i: 0,
        };
        let thread = std::thread::Builder::new()
            .name("sim-modem".into())
            .spawn(move || modem.run())?;
        Ok(SimModem {
            path,
            shared,
            thread: Some(thread),
        })
    }

    /// The slave device to open (`/dev/pts/N`).
    pub fn device_path(&self) -> &Path {
        &self.path
    }

    /// PDUs accepted so far, in order (only the newest `keep_received` of them, if set).
    pub fn received(&self) -> Vec<ReceivedPdu> {
        lock(&self.shared).received.clone()
    }

    /// How many PDUs were accepted since start, counting those `keep_received` let go.
    pub fn accepted(&self) -> u64 {
        lock(&self.shared).accepted
    }

    /// Command lines received so far (`AT+CPIN=` arguments redacted), in order.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared).commands.clone()
    }

    /// Makes the modem misbehave; see [`Fault`].
    pub fn inject(&self, fault: Fault) {
        let mut s = lock(&self.shared);
        match fault {
            Fault::CmsError(n) => s.submit_faults.push_back(SubmitFault::Cms(n)),
            Fault::PlainError => s.submit_faults.push_back(SubmitFault::Plain),
            Fault::Silence => s.silence = true,
            Fault::Delay(d) => s.extra_delay = d,
            Fault::Urc(u) => s.urcs.push_back(u),
            Fault::UrcStorm(n) => s.storm = s.storm.saturating_add(n),
            Fault::Hangup => s.hangup = true,
            Fault::BrokenFrom { from, how } => s.broken = Some((from.max(1), how)),
        }
    }

    /// PDUs given to this modem so far (well-formed ones, accepted or not).
    pub fn submits(&self) -> u64 {
        lock(&self.shared).submits
    }

    /// Ends every fault except a hangup.
    pub fn clear_faults(&self) {
        let mut s = lock(&self.shared);
        s.submit_faults.clear();
        s.silence = false;
        s.extra_delay = Duration::ZERO;
        s.urcs.clear();
        s.storm = 0;
        s.broken = None;
    }

    /// Submits to this number (digits, a leading `+` is ignored) answer `+CMS ERROR: 21`.
    pub fn set_rejected_number(&self, digits: &str) {
        self.set_rejected_number_with(digits, 21);
    }

    /// Submits to this number answer `+CMS ERROR: <code>` (a poison message: 500 makes one
    /// that fails the same way on every modem while other numbers go through).
    pub fn set_rejected_number_with(&self, digits: &str, code: u16) {
        let digits: String = digits.chars().filter(|c| c.is_ascii_digit()).collect();
        lock(&self.shared).rejected = Some((digits, code));
    }

    /// Registers to or leaves the network.
    pub fn set_registered(&self, registered: bool) {
        lock(&self.shared).registered = registered;
    }

    /// Stops the modem and closes the master.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        lock(&self.shared).stop = true;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SimModem {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug)]
enum Mode {
    Command,
    /// After the prompt of `AT+CMGS=<len>`: collecting hex up to ctrl-z.
    Pdu {
        len: usize,
        hex: Vec<u8>,
    },
}

struct SimThread {
    file: File,
    shared: Arc<Mutex<Shared>>,
    log: Option<File>,
    opts: SimOptions,
    echo: bool,
    /// Silence fault: commands are read and logged, but nothing is answered or done.
    silent: bool,
    cmee: u8,
    pin_ok: bool,
    pin_tries: u8,
    input: Vec<u8>,
    /// Input that arrived while an answer was still pending.
    backlog: Vec<u8>,
    mode: Mode,
    out: Vec<u8>,
    scheduled: Option<(Instant, Vec<u8>)>,
    next_mr: u8,
    storm_i: usize,
}

impl SimThread {
    fn run(mut self) {
        let mut buf = [0u8; 1024];
        // Idle turns sleep longer and longer (up to IDLE_SLEEP_MAX), so that a bench with
        // dozens of idle simulated modems does not take the cores the agent is measured on.
        let mut idle_sleep = Duration::from_millis(1);
        loop {
            let mut busy = false;
            let (urcs, storm, silence) = {
                let mut s = lock(&self.shared);
                if s.stop || s.hangup {
                    return; // dropping self closes the master
                }
                let storm = s.storm.min(STORM_BURST);
                s.storm -= storm;
                (std::mem::take(&mut s.urcs), storm, s.silence)
            };
            self.silent = silence;
            for u in urcs {
                self.line(&u);
            }
            for _ in 0..storm {
                self.storm_urc();
            }
            busy |= storm > 0;
            if let Some((at, _)) = &self.scheduled {
                if Instant::now() >= *at {
                    if let Some((_, reply)) = self.scheduled.take() {
                        self.storm_tick();
                        self.push(&reply);
                    }
                    busy = true;
                }
            }
            if self.scheduled.is_none() && !self.backlog.is_empty() {
                let backlog = std::mem::take(&mut self.backlog);
                self.input_bytes(&backlog);
                busy = true;
            }
            if self.scheduled.is_none() {
                match self.file.read(&mut buf) {
                    Ok(0) => {}
                    Ok(n) => {
                        busy = true;
                        self.input_bytes(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        // EIO: no client has the slave open (yet, or between agent restarts).
                        // Whatever we had to say is lost, as on a real port.
                        self.out.clear();
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            if !self.out.is_empty() {
                match self.file.write(&self.out) {
                    Ok(n) => {
                        self.out.drain(..n);
                        busy = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => self.out.clear(),
                }
            }
            if busy {
                idle_sleep = Duration::from_millis(1);
            } else {
                let mut nap = idle_sleep;
                if let Some((at, _)) = &self.scheduled {
                    nap = nap.min(at.saturating_duration_since(Instant::now()));
                }
                std::thread::sleep(nap.max(Duration::from_micros(200)));
                idle_sleep = (idle_sleep * 2).min(IDLE_SLEEP_MAX);
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.silent {
            return;
        }
        if self.out.len() + bytes.len() <= MAX_OUTPUT {
            self.out.extend_from_slice(bytes);
        }
    }

    fn line(&mut self, text: &str) {
        self.push(format!("\r\n{text}\r\n").as_bytes());
    }

    fn storm_urc(&mut self) {
        let urc = STORM_URCS[self.storm_i % STORM_URCS.len()];
        self.storm_i += 1;
        self.line(urc);
    }

    /// During a storm, one URC before each answer.
    fn storm_tick(&mut self) {
        let take = {
            let mut s = lock(&self.shared);
            if s.storm > 0 {
                s.storm -= 1;
                true
            } else {
                false
            }
        };
        if take {
            self.storm_urc();
        }
    }

    fn ok(&mut self, info: &[String]) {
        self.storm_tick();
        for l in info {
            self.line(l);
        }
        self.line("OK");
    }

    fn error(&mut self) {
        self.storm_tick();
        self.line("ERROR");
    }

    fn cme(&mut self, code: u16) {
        if self.cmee == 0 {
            self.error();
        } else {
            self.storm_tick();
            self.line(&format!("+CME ERROR: {code}"));
        }
    }

    fn cms(&mut self, code: u16) {
        self.storm_tick();
        self.line(&format!("+CMS ERROR: {code}"));
    }

    fn sim_ready(&self) -> bool {
        self.opts.require_pin.is_none() || self.pin_ok
    }

    fn input_bytes(&mut self, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            if self.scheduled.is_some() {
                // an answer is pending: the rest waits, like on a modem busy with the SMSC
                self.backlog.extend_from_slice(&bytes[i..]);
                return;
            }
            match &mut self.mode {
                Mode::Command => {
                    if self.echo {
                        self.push(&[b]);
                    }
                    match b {
                        b'\r' => {
                            let line = std::mem::take(&mut self.input);
                            self.command(&line);
                        }
                        b'\n' | CTRL_Z | ESC => {}
                        0x08 => {
                            self.input.pop();
                        }
                        _ if self.input.len() < MAX_INPUT => self.input.push(b),
                        _ => {}
                    }
                }
                Mode::Pdu { hex, .. } => match b {
                    CTRL_Z => {
                        if let Mode::Pdu { len, hex } =
                            std::mem::replace(&mut self.mode, Mode::Command)
                        {
                            if self.echo {
                                self.push(&[b]);
                            }
                            self.submit(len, &hex);
                        }
                    }
                    ESC => self.mode = Mode::Command,
                    b'\r' | b'\n' => {}
                    _ => {
                        if hex.len() >= MAX_INPUT {
                            self.mode = Mode::Command;
                            self.cms(304);
                        } else {
                            hex.push(b);
                            if self.echo {
                                self.push(&[b]);
                            }
                        }
                    }
                },
            }
        }
    }

    fn command(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim().to_string();
        let Some(body) = text
            .get(..2)
            .filter(|at| at.eq_ignore_ascii_case("AT"))
            .and_then(|_| text.get(2..))
        else {
            return; // not a command: a modem ignores it
        };
        let body = body.to_string();
        let upper = body.to_ascii_uppercase();
        {
            let mut s = lock(&self.shared);
            if s.commands.len() < MAX_COMMANDS {
                let logged = if upper.starts_with("+CPIN=") {
                    "AT+CPIN=<redacted>".to_string()
                } else {
                    format!("AT{upper}")
                };
                s.commands.push(logged);
            }
        }
        if self.silent {
            return;
        }
        let s = |v: &str| vec![v.to_string()];
        match upper.as_str() {
            "" | "Z" | "&F" | "&W" => self.ok(&[]),
            "E" | "E0" | "E1" => {
                self.echo = upper == "E1";
                self.ok(&[]);
            }
            "I" => self.ok(&s("mailbell simulated modem")),
            "+CMEE?" => self.ok(&s(&format!("+CMEE: {}", self.cmee))),
            "+CMGF?" => self.ok(&s("+CMGF: 0")),
            "+CMGF=0" | "+CMGF=1" => self.ok(&[]),
            "+CPIN?" => {
                let state = if self.sim_ready() {
                    "READY"
                } else if self.pin_tries == 0 {
                    "SIM PUK"
                } else {
                    "SIM PIN"
                };
                self.ok(&s(&format!("+CPIN: {state}")));
            }
            "+CREG?" => {
                let registered = lock(&self.shared).registered;
                let stat = if !self.sim_ready() {
                    0
                } else if registered {
                    1
                } else {
                    2
                };
                self.ok(&s(&format!("+CREG: 0,{stat}")));
            }
            "+CSQ" => self.ok(&s("+CSQ: 21,99")),
            "+CGMI" | "+GMI" => self.ok(&s("mailbell")),
            "+CGMM" | "+GMM" => self.ok(&s("MB-SIM")),
            "+CGMR" | "+GMR" => self.ok(&s("1.0")),
            "+CGSN" | "+GSN" => self.ok(&s("356938035643809")),
            "+CIMI" => {
                if self.sim_ready() {
                    self.ok(&s("001010123456789"));
                } else {
                    self.cme(11);
                }
            }
            "+CSCA?" => self.ok(&s("+CSCA: \"+10000000000\",145")),
            "+CFUN?" => self.ok(&s("+CFUN: 1")),
            "+CMMS?" => self.ok(&s("+CMMS: 0")),
            "+CSCS?" => self.ok(&s("+CSCS: \"GSM\"")),
            "+COPS?" => self.ok(&s("+COPS: 0,0,\"MAILBELL\"")),
            "+CPMS?" => self.ok(&s("+CPMS: \"SM\",0,30,\"SM\",0,30,\"SM\",0,30")),
            _ => self.command_with_argument(&body, &upper),
        }
    }

    fn command_with_argument(&mut self, body: &str, upper: &str) {
        if let Some(n) = upper.strip_prefix("+CMEE=") {
            match n.trim().parse::<u8>() {
                Ok(n) if n <= 2 => {
                    self.cmee = n;
                    self.ok(&[]);
                }
                _ => self.error(),
            }
        } else if upper.starts_with("+CPIN=") {
            let given = body[6..]
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_string();
            match self.opts.require_pin.clone() {
                None => self.cme(3),
                Some(_) if self.pin_ok => self.cme(3),
                Some(_) if self.pin_tries == 0 => self.cme(12),
                Some(pin) if pin == given => {
                    self.pin_ok = true;
                    self.ok(&[]);
                }
                Some(_) => {
                    self.pin_tries -= 1;
                    self.cme(16);
                }
            }
        } else if let Some(n) = upper.strip_prefix("+CMGS=") {
            let registered = lock(&self.shared).registered;
            match n.trim().parse::<usize>() {
                Ok(len) if (1..=255).contains(&len) => {
                    if !self.sim_ready() {
                        self.cms(311);
                    } else if !registered {
                        self.cms(331);
                    } else {
                        self.storm_tick();
                        self.push(b"\r\n> ");
                        self.mode = Mode::Pdu {
                            len,
                            hex: Vec::new(),
                        };
                        self.storm_tick();
                    }
                }
                _ => self.cms(304),
            }
        } else if upper.starts_with("+CPMS=") {
            self.ok(&["+CPMS: 0,30,0,30,0,30".to_string()]);
        } else if ["+CREG=", "+CSCA=", "+CFUN=", "+CMMS=", "+CNMI=", "+CSCS="]
            .iter()
            .any(|p| upper.starts_with(p))
        {
            self.ok(&[]);
        } else {
            self.error();
        }
    }

    fn submit(&mut self, len: usize, hex: &[u8]) {
        if self.silent {
            return;
        }
        let hex = String::from_utf8_lossy(hex).into_owned();
        let pdu = match ::hex::decode(&hex) {
            Ok(p) if !p.is_empty() => p,
            _ => return self.cms(304),
        };
        let smsc = usize::from(pdu[0]);
        if pdu.len() < 1 + smsc || len != pdu.len() - 1 - smsc {
            return self.cms(304);
        }
        let (fault, rejected, extra, broken) = {
            let mut s = lock(&self.shared);
            s.submits += 1;
            let broken = s
                .broken
                .filter(|&(from, _)| s.submits >= from)
                .map(|(_, how)| how);
            match broken {
                Some(Broken::Silence) => s.silence = true,
                Some(Broken::Vanish) => s.hangup = true,
                _ => {}
            }
            (
                s.submit_faults.pop_front(),
                s.rejected.clone(),
                s.extra_delay,
                broken,
            )
        };
        match broken {
            Some(Broken::Cms(n)) => return self.cms(n),
            Some(Broken::PlainError) => return self.error(),
            Some(Broken::Silence) => {
                self.silent = true;
                return;
            }
            Some(Broken::Vanish) => return,
            Some(Broken::Garbage) => {
                self.push(b"\r\n\xfe#~@!\x07\r\n\xff\xff\r\n+\x00\r\n");
                return;
            }
            None => {}
        }
        match fault {
            Some(SubmitFault::Cms(n)) => return self.cms(n),
            Some(SubmitFault::Plain) => return self.error(),
            None => {}
        }
        if let Some((digits, code)) = rejected {
            if destination(&pdu).as_deref() == Some(digits.as_str()) {
                return self.cms(code);
            }
        }
        let mr = self.next_mr;
        self.next_mr = self.next_mr.wrapping_add(1);
        {
            let mut shared = lock(&self.shared);
            if let Some(keep) = shared.keep_received {
                let held = shared.received.len();
                let over = (held + 1).saturating_sub(keep).min(held);
                shared.received.drain(..over);
            }
            shared.accepted += 1;
            shared.received.push(ReceivedPdu {
                tpdu_len: len,
                hex: hex.clone(),
                mr,
                at: Instant::now(),
            });
        }
        if let Some(log) = self.log.as_mut() {
            let t_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let line = serde_json::json!({"t_ms": t_ms, "tpdu_len": len, "hex": hex, "mr": mr});
            let _ = writeln!(log, "{line}").and_then(|()| log.flush());
        }
        let reply = format!("\r\n+CMGS: {mr}\r\n\r\nOK\r\n").into_bytes();
        let delay = self.opts.submit_delay + extra;
        if delay.is_zero() {
            self.storm_tick();
            self.push(&reply);
        } else {
            self.scheduled = Some((Instant::now() + delay, reply));
        }
    }
}

/// The destination digits of an SMS-SUBMIT PDU (SMSC part included), if it has a numeric one.
///
/// ```text
/// SCA-len SCA... FO MR DA-len(digits) DA-TOA DA(semi-octets, F-padded) PID DCS ...
/// ```
fn destination(pdu: &[u8]) -> Option<String> {
    let smsc = usize::from(*pdu.first()?);
    let mut i = 1 + smsc;
    let first = *pdu.get(i)?;
    if first & 0x03 != 0x01 {
        return None; // not SMS-SUBMIT
    }
    i += 2; // first octet, MR
    let digits = usize::from(*pdu.get(i)?);
    let toa = *pdu.get(i + 1)?;
    if toa & 0x70 == 0x50 {
        return None; // alphanumeric
    }
    let octets = pdu.get(i + 2..i + 2 + digits.div_ceil(2))?;
    let mut out = String::with_capacity(digits);
    for &o in octets {
        for nibble in [o & 0x0f, o >> 4] {
            if out.len() == digits || nibble == 0x0f {
                break;
            }
            out.push(char::from(b"0123456789*#abc"[usize::from(nibble.min(14))]));
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A raw client on the slave, like a process that opened the device.
    struct Client {
        f: File,
        got: Vec<u8>,
    }

    impl Client {
        fn open(path: &Path) -> Client {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let mut t = tcgetattr(&f).unwrap();
            cfmakeraw(&mut t);
            tcsetattr(&f, SetArg::TCSANOW, &t).unwrap();
            let flags = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
            let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
            fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags)).unwrap();
            Client { f, got: Vec::new() }
        }

        fn send(&mut self, s: &[u8]) {
            self.f.write_all(s).unwrap();
        }

        /// Reads until the output contains `needle`; returns everything read so far.
        fn until(&mut self, needle: &str) -> String {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 512];
            loop {
                let text = String::from_utf8_lossy(&self.got).into_owned();
                if text.contains(needle) {
                    self.got.clear();
                    return text;
                }
                assert!(Instant::now() < deadline, "no {needle:?} in {text:?}");
                match self.f.read(&mut buf) {
                    Ok(n) => self.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("read: {e}"),
                }
            }
        }
    }

    // 00 | 11 00 0B 91 6407281553F8 00 00 AA 0A E8329BFD4697D9EC37: to +46708251358
    const PDU: &str = "0011000B916407281553F80000AA0AE8329BFD4697D9EC37";

    #[test]
    fn destination_is_read_from_the_pdu() {
        let pdu = ::hex::decode(PDU).unwrap();
        assert_eq!(destination(&pdu).as_deref(), Some("46708251358"));
        let with_smsc = ::hex::decode(format!("07911326040000F0{}", &PDU[2..])).unwrap();
        assert_eq!(destination(&with_smsc).as_deref(), Some("46708251358"));
        assert_eq!(destination(&[0x00, 0x04]), None);
        assert_eq!(destination(&[0x00, 0x11, 0x00, 0x0b]), None);
    }

    #[test]
    fn echo_commands_and_a_submit() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let sim = SimModem::spawn(SimOptions {
            pdu_log: Some(log.path().to_path_buf()),
            ..SimOptions::default()
        })
        .unwrap();
        let mut c = Client::open(sim.device_path());
        c.send(b"AT\r");
        assert_eq!(
            c.until("OK\r\n"),
            "AT\r\r\nOK\r\n",
            "echo is on at power-up"
        );
        c.send(b"ATE0\r");
        c.until("OK\r\n");
        c.send(b"AT+CSQ\r");
        assert_eq!(c.until("OK\r\n"), "\r\n+CSQ: 21,99\r\n\r\nOK\r\n");
        c.send(b"AT+BOGUS\r");
        c.until("ERROR\r\n");
        c.send("€uro\r".as_bytes());
        c.send(b"\xff\xfe\r");
        c.send(b"AT\r");
        assert_eq!(c.until("OK\r\n"), "\r\nOK\r\n", "garbage is ignored");
        c.send(b"AT+CMGS=23\r");
        assert_eq!(c.until("> "), "\r\n> ");
        c.send(PDU.as_bytes());
        c.send(b"\x1a");
        assert!(c.until("OK\r\n").contains("+CMGS: 1\r\n"));
        // wrong length
        c.send(b"AT+CMGS=22\r");
        c.until("> ");
        c.send(format!("{PDU}\x1a").as_bytes());
        c.until("+CMS ERROR: 304\r\n");
        // escape cancels
        c.send(b"AT+CMGS=23\r");
        c.until("> ");
        c.send(b"0011\x1bAT\r");
        c.until("OK\r\n");
        let got = sim.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].tpdu_len, got[0].hex.as_str(), got[0].mr),
            (23, PDU, 1)
        );
        let lines: Vec<String> = BufReader::new(File::open(log.path()).unwrap())
            .lines()
            .map(|l| l.unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["tpdu_len"], 23);
        assert_eq!(v["hex"], PDU);
        assert_eq!(v["mr"], 1);
        assert!(v["t_ms"].as_u64().unwrap() > 0);
    }

    #[test]
    fn client_can_leave_and_come_back() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        for round in 0..3 {
            let mut c = Client::open(sim.device_path());
            c.send(b"ATE0\r");
            c.until("OK\r\n");
            c.send(b"AT+CGSN\r");
            assert!(
                c.until("OK\r\n").contains("356938035643809"),
                "round {round}"
            );
            drop(c);
            std::thread::sleep(Duration::from_millis(30)); // the sim sees EIO meanwhile
        }
    }

    #[test]
    fn pin_faults_and_rejected_number() {
        let sim = SimModem::spawn(SimOptions {
            require_pin: Some("1234".into()),
            ..SimOptions::default()
        })
        .unwrap();
        let mut c = Client::open(sim.device_path());
        c.send(b"ATE0\r");
        c.until("OK\r\n");
        c.send(b"AT+CMEE=1\r");
        c.until("OK\r\n");
        c.send(b"AT+CPIN?\r");
        assert!(c.until("OK\r\n").contains("+CPIN: SIM PIN"));
        c.send(b"AT+CMGS=23\r");
        c.until("+CMS ERROR: 311\r\n");
        c.send(b"AT+CPIN=\"9999\"\r");
        c.until("+CME ERROR: 16\r\n");
        c.send(b"AT+CPIN=\"1234\"\r");
        c.until("OK\r\n");
        c.send(b"AT+CPIN?\r");
        assert!(c.until("OK\r\n").contains("READY"));
        assert!(sim.commands().iter().all(|c| !c.contains("1234")));

        sim.inject(Fault::CmsError(42));
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        c.until("+CMS ERROR: 42\r\n");
        sim.set_rejected_number("+46708251358");
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        c.until("+CMS ERROR: 21\r\n");
        sim.inject(Fault::Urc("+CMTI: \"SM\",4".into()));
        c.until("+CMTI: \"SM\",4\r\n");
        assert!(sim.received().is_empty());
    }

    /// With `keep_received`, the newest PDUs stay and the oldest go (the agent's own
    /// simulator must not grow with every SMS for as long as the agent runs).
    #[test]
    fn keep_received_bounds_the_pdus_held() {
        let sim = SimModem::spawn(SimOptions {
            keep_received: Some(2),
            ..SimOptions::default()
        })
        .unwrap();
        let mut c = Client::open(sim.device_path());
        c.send(b"ATE0\r");
        c.until("OK\r\n");
        for n in 1..=3 {
            c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
            assert!(c.until("OK\r\n").contains(&format!("+CMGS: {n}")));
        }
        let kept: Vec<u8> = sim.received().iter().map(|p| p.mr).collect();
        assert_eq!(kept, [2, 3]);
        assert_eq!(sim.accepted(), 3, "the count goes on past what is kept");
    }

    #[test]
    fn a_modem_broken_from_its_nth_submit() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let mut c = Client::open(sim.device_path());
        c.send(b"ATE0\r");
        c.until("OK\r\n");
        sim.inject(Fault::BrokenFrom {
            from: 2,
            how: Broken::Cms(500),
        });
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        assert!(
            c.until("OK\r\n").contains("+CMGS: 1"),
            "the first still goes"
        );
        for _ in 0..3 {
            c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
            c.until("+CMS ERROR: 500\r\n");
        }
        assert_eq!((sim.received().len(), sim.submits()), (1, 4));
        // garbage: no final result to a submit, other commands still answered
        sim.inject(Fault::BrokenFrom {
            from: 1,
            how: Broken::Garbage,
        });
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        let got = c.until("\r\n+\x00\r\n");
        assert!(!got.contains("OK") && !got.contains("ERROR"), "{got:?}");
        c.send(b"AT\r");
        c.until("OK\r\n");
        // silence: the submit and everything after it go unanswered
        sim.inject(Fault::BrokenFrom {
            from: 1,
            how: Broken::Silence,
        });
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        c.until("> ");
        std::thread::sleep(Duration::from_millis(50));
        c.send(b"AT\r");
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 64];
        assert!(
            matches!(c.f.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "silent"
        );
        sim.clear_faults();
        c.send(b"AT\r");
        c.until("OK\r\n");
        // a poison number answers its own code
        sim.set_rejected_number_with("46708251358", 500);
        c.send(format!("AT+CMGS=23\r{PDU}\x1a").as_bytes());
        c.until("+CMS ERROR: 500\r\n");
        assert_eq!(sim.received().len(), 1);
    }

    #[test]
    fn hangup_removes_the_device() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let mut c = Client::open(sim.device_path());
        c.send(b"AT\r");
        c.until("OK");
        sim.inject(Fault::Hangup);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 16];
        loop {
            match c.f.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => break,
                _ => {}
            }
            assert!(Instant::now() < deadline, "client still connected");
            std::thread::sleep(Duration::from_millis(5));
        }
        sim.close();
    }
}
