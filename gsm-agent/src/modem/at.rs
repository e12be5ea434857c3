//! The AT command dialogue, sans I/O: bytes in, events and bytes out, time passed in.
//!
//! [`Dialogue`] runs one command at a time. [`Dialogue::start`] returns the bytes to write,
//! [`Dialogue::feed`] takes whatever the modem sent and returns [`Event`]s, and
//! [`Dialogue::poll_timeout`] ends a command whose deadline passed. Nothing here reads a port,
//! sleeps or looks at the clock; the serial-port thread in `driver` is a thin shell around it
//! (the shape of rustls `conn.rs`).
//!
//! What the modem sends (V.250 with `ATV1`; `<cr><lf>` framing, `ATE1` echoes the command):
//!
//! ```text
//! AT+CSQ<cr>                                        command, echoed while ATE1
//! <cr><lf>+CSQ: 21,99<cr><lf>                        information line(s)
//! <cr><lf>OK<cr><lf>                                final result: OK | ERROR |
//!                                                   +CMS ERROR: <n|text> | +CME ERROR: <n|text>
//! <cr><lf>+CMTI: "SM",3<cr><lf>                     unsolicited result code, at ANY time,
//!                                                   also in the middle of a command
//! <cr><lf>+CMT: ,24<cr><lf>0791...<cr><lf>           URCs that carry a PDU on the next line
//! ```
//!
//! Sending one SMS-SUBMIT in PDU mode (TS 27.005 §3.5.1):
//!
//! ```text
//! -> AT+CMGS=<tpdu_len><cr>
//! <- <cr><lf>> <space>                              the prompt, with NO line ending
//! -> <pdu hex><ctrl-z>                              (<esc> would cancel)
//! <- <cr><lf>+CMGS: <mr><cr><lf><cr><lf>OK<cr><lf>  seconds later, once the SMSC answered
//!    or <cr><lf>+CMS ERROR: <n><cr><lf>
//! ```
//!
//! URCs never end a command and are never taken for its reply: a line is an information line
//! of the running command only if it carries that command's own prefix (`+CREG: 0,1` answers
//! `AT+CREG?`, but is a URC during `AT+CMGS`). Lines are capped at [`MAX_LINE`] bytes; a longer
//! line is a protocol error and is discarded up to its end.

use std::time::{Duration, Instant};

use super::cms::{cme_code_from_text, cms_code_from_text};

/// The longest line accepted from the modem, in bytes.
pub const MAX_LINE: usize = 4096;

/// Written to cancel a pending PDU input (after the prompt) and return to command mode.
pub const CANCEL: &[u8] = b"\x1b";

const CTRL_Z: u8 = 0x1a;

/// One command of the dialogue.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// A command line such as `AT+CSQ`, written with a trailing `<cr>`.
    Line(String),
    /// `AT+CMGS=<tpdu_len>`, then, after the prompt, `<hex><ctrl-z>`.
    Submit {
        /// TPDU length in octets (the PDU without its SMSC part).
        tpdu_len: usize,
        /// The whole PDU (SMSC part included) as hexadecimal text.
        hex: String,
    },
}

impl Command {
    /// A command line.
    pub fn line(text: impl Into<String>) -> Self {
        Command::Line(text.into())
    }

    /// The command for logs: secrets (`AT+CPIN=...`) and PDUs are left out.
    pub fn redacted(&self) -> String {
        match self {
            Command::Line(text) if is_secret(text) => "AT+CPIN=<redacted>".to_string(),
            Command::Line(text) => text.clone(),
            Command::Submit { tpdu_len, .. } => format!("AT+CMGS={tpdu_len}"),
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

fn is_secret(text: &str) -> bool {
    let upper = text.to_ascii_uppercase();
    upper.starts_with("AT+CPIN=") || upper.starts_with("AT+CPWD=") || upper.starts_with("AT+CLCK=")
}

/// Deadlines of the dialogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From writing a command to its final result, or to the `> ` prompt of `AT+CMGS`.
    pub command: Duration,
    /// From writing the PDU to `+CMGS: <mr>`: the modem waits for the SMSC.
    pub submit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command: Duration::from_secs(5),
            submit: Duration::from_secs(60),
        }
    }
}

/// What the modem said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The `> ` prompt of `AT+CMGS`: the PDU is now waiting in [`Dialogue::take_transmit`].
    Prompt,
    /// The running command ended: its information lines, or why it failed.
    Final(Result<Vec<String>, AtError>),
    /// An unsolicited result code; a `+CMT`/`+CDS`/`+CBM` head and its PDU line are joined by
    /// `\n`.
    Urc(String),
    /// A line over [`MAX_LINE`] arrived while no command was running and was discarded.
    Overflow,
}

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AtError {
    /// The plain final result `ERROR`.
    #[error("modem answered ERROR")]
    Error,
    /// `+CMS ERROR: <n>` (verbose texts mapped to their number, unknown ones to 500).
    #[error("+CMS ERROR: {0}")]
    Cms(u16),
    /// `+CME ERROR: <n>` (verbose texts mapped to their number, unknown ones to 100).
    #[error("+CME ERROR: {0}")]
    Cme(u16),
    /// No final result before the deadline.
    #[error("modem did not answer in time")]
    Timeout,
    /// The modem sent a line over [`MAX_LINE`] bytes; the command's reply is lost.
    #[error("modem sent a line over {MAX_LINE} bytes")]
    LineTooLong,
    /// [`Dialogue::start`] while another command runs.
    #[error("a command is already running")]
    InProgress,
    /// The command cannot be written (empty, not `AT...`, control characters, bad PDU hex).
    #[error("invalid command: {0}")]
    InvalidCommand(&'static str),
}

#[derive(Debug)]
enum State {
    Idle,
    /// A command line is running; `name` is its prefix (`+CREG`, `^SYSINFO`, `E0`).
    Running {
        echo: String,
        name: String,
    },
    /// `AT+CMGS=<n>` written, waiting for `> `.
    AwaitPrompt {
        echo: String,
        hex: String,
    },
    /// The PDU is handed out, waiting for `+CMGS: <mr>` and `OK`.
    AwaitResult {
        hex: String,
    },
}

#[derive(Debug)]
enum PendingUrc {
    /// `+CMT: ,24` waits for its PDU line.
    PduLine(String),
    /// A URC with an open quoted string (`+CUSD: 0,"two<cr><lf>lines",15`).
    Quoted(String),
}

/// The AT dialogue state machine. See the module documentation.
#[derive(Debug)]
pub struct Dialogue {
    timeouts: Timeouts,
    line: Vec<u8>,
    discarding: bool,
    skip_space: bool,
    state: State,
    info: Vec<String>,
    deadline: Option<Instant>,
    pending_urc: Option<PendingUrc>,
    transmit: Vec<u8>,
}

impl Dialogue {
    /// A dialogue with no command running.
    pub fn new(timeouts: Timeouts) -> Self {
        Dialogue {
            timeouts,
            line: Vec::new(),
            discarding: false,
            skip_space: false,
            state: State::Idle,
            info: Vec::new(),
            deadline: None,
            pending_urc: None,
            transmit: Vec::new(),
        }
    }

    /// Forgets everything: the running command, buffered bytes and pending output.
    pub fn reset(&mut self) {
        *self = Dialogue::new(self.timeouts);
    }

    /// Sets the deadline of the next `AT+CMGS` from its PDU to its answer (the driver derives
    /// it from the modem's recent submit times). A submit already waiting for its answer keeps
    /// the deadline it got.
    pub fn set_submit_timeout(&mut self, submit: Duration) {
        self.timeouts.submit = submit;
    }

    /// The deadlines now in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// True when no command runs.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// When the running command times out, if one runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Starts `cmd` and returns the bytes to write.
    pub fn start(&mut self, cmd: Command, now: Instant) -> Result<Vec<u8>, AtError> {
        if !self.is_idle() {
            return Err(AtError::InProgress);
        }
        let (state, bytes) = match cmd {
            Command::Line(text) => {
                validate_line(&text)?;
                let name = command_name(&text);
                let mut bytes = text.clone().into_bytes();
                bytes.push(b'\r');
                (State::Running { echo: text, name }, bytes)
            }
            Command::Submit { tpdu_len, hex } => {
                validate_pdu(tpdu_len, &hex)?;
                let echo = format!("AT+CMGS={tpdu_len}");
                let mut bytes = echo.clone().into_bytes();
                bytes.push(b'\r');
                (State::AwaitPrompt { echo, hex }, bytes)
            }
        };
        self.state = state;
        self.info.clear();
        self.transmit.clear();
        self.deadline = Some(now + self.timeouts.command);
        Ok(bytes)
    }

    /// Bytes the dialogue wants written now (the PDU after the prompt), if any.
    pub fn take_transmit(&mut self) -> Option<Vec<u8>> {
        if self.transmit.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.transmit))
        }
    }

    /// Ends the running command with [`AtError::Timeout`] if its deadline has passed.
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Event> {
        match self.deadline {
            Some(deadline) if now >= deadline && !self.is_idle() => {
                self.transmit.clear();
                Some(self.finish(Err(AtError::Timeout)))
            }
            _ => None,
        }
    }

    /// Takes bytes read from the modem and returns what they mean, in order.
    pub fn feed(&mut self, data: &[u8], now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for &byte in data {
            self.feed_byte(byte, now, &mut events);
        }
        events
    }

    fn feed_byte(&mut self, byte: u8, now: Instant, events: &mut Vec<Event>) {
        if std::mem::take(&mut self.skip_space) && byte == b' ' {
            return;
        }
        if self.discarding {
            if byte == b'\r' || byte == b'\n' {
                self.discarding = false;
            }
            return;
        }
        match byte {
            b'\r' | b'\n' => {
                if !self.line.is_empty() {
                    let line = String::from_utf8_lossy(&self.line).into_owned();
                    self.line.clear();
                    self.on_line(line, events);
                }
            }
            b'>' if self.line.is_empty() && matches!(self.state, State::AwaitPrompt { .. }) => {
                if let State::AwaitPrompt { hex, .. } =
                    std::mem::replace(&mut self.state, State::Idle)
                {
                    self.transmit.extend_from_slice(hex.as_bytes());
                    self.transmit.push(CTRL_Z);
                    self.state = State::AwaitResult { hex };
                    self.deadline = Some(now + self.timeouts.submit);
                    self.skip_space = true;
                    events.push(Event::Prompt);
                }
            }
            _ => {
                if self.line.len() >= MAX_LINE {
                    self.line.clear();
                    self.discarding = true;
                    self.pending_urc = None;
                    if self.is_idle() {
                        events.push(Event::Overflow);
                    } else {
                        events.push(self.finish(Err(AtError::LineTooLong)));
                    }
                } else {
                    self.line.push(byte);
                }
            }
        }
    }

    fn finish(&mut self, result: Result<(), AtError>) -> Event {
        self.state = State::Idle;
        self.deadline = None;
        let info = std::mem::take(&mut self.info);
        Event::Final(result.map(|()| info))
    }

    fn on_line(&mut self, line: String, events: &mut Vec<Event>) {
        let text = line.trim_matches(|c: char| c == ' ' || c == '\t');
        if text.is_empty() {
            return;
        }
        if let Some(pending) = self.pending_urc.take() {
            match pending {
                PendingUrc::PduLine(head) => {
                    if is_hex(text) {
                        events.push(Event::Urc(format!("{head}\n{text}")));
                        return;
                    }
                    // not a PDU after all: report the head alone and read this line normally
                    events.push(Event::Urc(head));
                }
                PendingUrc::Quoted(mut acc) => {
                    if final_result(text).is_none() {
                        acc.push('\n');
                        acc.push_str(text);
                        if acc.len() > MAX_LINE {
                            if self.is_idle() {
                                events.push(Event::Overflow);
                            } else {
                                events.push(self.finish(Err(AtError::LineTooLong)));
                            }
                        } else if quotes_balanced(&acc) {
                            events.push(Event::Urc(acc));
                        } else {
                            self.pending_urc = Some(PendingUrc::Quoted(acc));
                        }
                        return;
                    }
                    events.push(Event::Urc(acc));
                }
            }
        }

        // the echo of what we wrote (ATE1)
        match &self.state {
            State::Running { echo, .. } | State::AwaitPrompt { echo, .. }
                if text.eq_ignore_ascii_case(echo) =>
            {
                return;
            }
            State::AwaitResult { hex }
                if text
                    .trim_end_matches(char::from(CTRL_Z))
                    .eq_ignore_ascii_case(hex) =>
            {
                return;
            }
            _ => {}
        }

        let running_name = match &self.state {
            State::Idle => None,
            State::Running { name, .. } => Some(name.as_str()),
            State::AwaitPrompt { .. } | State::AwaitResult { .. } => Some("+CMGS"),
        };
        let Some(running_name) = running_name else {
            // nothing runs: a stray final result is dropped, anything else is unsolicited
            if final_result(text).is_none() || is_call_result(text) {
                self.urc(text, events);
            }
            return;
        };

        let dialing = running_name.starts_with('D') || running_name == "A";
        if let Some(result) = final_result(text) {
            if !is_call_result(text) || dialing {
                events.push(self.finish(result));
                return;
            }
        }
        let name = line_name(text);
        if name != running_name && is_urc_name(&name) {
            self.urc(text, events);
        } else {
            self.info.push(text.to_string());
        }
    }

    fn urc(&mut self, text: &str, events: &mut Vec<Event>) {
        let name = line_name(text);
        if matches!(name.as_str(), "+CMT" | "+CDS" | "+CBM") {
            self.pending_urc = Some(PendingUrc::PduLine(text.to_string()));
        } else if !quotes_balanced(text) {
            self.pending_urc = Some(PendingUrc::Quoted(text.to_string()));
        } else {
            events.push(Event::Urc(text.to_string()));
        }
    }
}

/// The final result a line stands for, if it is one.
fn final_result(text: &str) -> Option<Result<(), AtError>> {
    match text {
        "OK" => return Some(Ok(())),
        "ERROR" | "COMMAND NOT SUPPORT" | "TOO MANY PARAMETERS" => {
            return Some(Err(AtError::Error))
        }
        "NO CARRIER" | "BUSY" | "NO ANSWER" | "NO DIALTONE" => return Some(Err(AtError::Error)),
        _ => {}
    }
    if let Some(rest) = strip_prefix_ci(text, "+CMS ERROR:") {
        let code = rest
            .trim()
            .parse::<u16>()
            .ok()
            .or_else(|| cms_code_from_text(rest))
            .unwrap_or(500);
        return Some(Err(AtError::Cms(code)));
    }
    if let Some(rest) = strip_prefix_ci(text, "+CME ERROR:") {
        let code = rest
            .trim()
            .parse::<u16>()
            .ok()
            .or_else(|| cme_code_from_text(rest))
            .unwrap_or(100);
        return Some(Err(AtError::Cme(code)));
    }
    None
}

/// Final results of `ATD`/`ATA` that modems also send unsolicited when a call ends.
fn is_call_result(text: &str) -> bool {
    matches!(text, "NO CARRIER" | "BUSY" | "NO ANSWER" | "NO DIALTONE")
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// The prefix of a response line: `+CREG` for `+CREG: 0,1`, `^RSSI` for `^RSSI:17`,
/// the whole line (upper case) for `RING` or `Call Ready`.
fn line_name(text: &str) -> String {
    if text.starts_with(['+', '^', '*', '$', '#', '%']) {
        let end = text.find(':').unwrap_or(text.len());
        text[..end].trim().to_ascii_uppercase()
    } else {
        text.to_ascii_uppercase()
    }
}

/// The prefix a command's information lines carry: `AT+CREG?` → `+CREG`, `AT^SYSINFO` →
/// `^SYSINFO`, `ATE0` → `E0`, `AT` → ``.
fn command_name(cmd: &str) -> String {
    let body = cmd.get(2..).unwrap_or("");
    let mut name = String::new();
    for (i, c) in body.char_indices() {
        let symbol = i == 0 && matches!(c, '+' | '^' | '*' | '$' | '#' | '%' | '&');
        if symbol || c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_uppercase());
        } else {
            break;
        }
    }
    name
}

/// Response prefixes that modems send unsolicited (27.005, 27.007, Huawei, SIMCom, Quectel).
const URC_NAMES: &[&str] = &[
    "+CMTI",
    "+CMT",
    "+CDSI",
    "+CDS",
    "+CBM",
    "+CBMI",
    "+CREG",
    "+CGREG",
    "+CEREG",
    "+C5GREG",
    "+CUSD",
    "+CRING",
    "RING",
    "+CLIP",
    "+CCWA",
    "+CIEV",
    "+CPIN",
    "+CFUN",
    "+CTZV",
    "+CTZE",
    "+CTZU",
    "+NITZ",
    "*PSUTTZ",
    "DST",
    "+CGEV",
    "+CSSI",
    "+CSSU",
    "+PACSP",
    "+QIND",
    "+QUSIM",
    "+STIN",
    "+CUSATP",
    "+CUSATEND",
    "+CSQN",
    "NO CARRIER",
    "RDY",
    "CALL READY",
    "SMS READY",
    "NORMAL POWER DOWN",
    "POWERED DOWN",
    "UNDER-VOLTAGE POWER DOWN",
    "UNDER-VOLTAGE WARNNING",
    "OVER-VOLTAGE WARNNING",
    "+CPBREADY",
    "PB DONE",
];

fn is_urc_name(name: &str) -> bool {
    name.starts_with('^') || URC_NAMES.contains(&name)
}

fn quotes_balanced(text: &str) -> bool {
    text.bytes().filter(|&b| b == b'"').count() % 2 == 0
}

fn is_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn validate_line(text: &str) -> Result<(), AtError> {
    if !text.get(..2).is_some_and(|h| h.eq_ignore_ascii_case("AT")) {
        return Err(AtError::InvalidCommand("does not start with AT"));
    }
    if text.bytes().any(|b| b.is_ascii_control()) {
        return Err(AtError::InvalidCommand("control character in command"));
    }
    if text.len() > MAX_LINE {
        return Err(AtError::InvalidCommand("command too long"));
    }
    Ok(())
}

fn validate_pdu(tpdu_len: usize, hex: &str) -> Result<(), AtError> {
    if !is_hex(hex) || hex.len() % 2 != 0 {
        return Err(AtError::InvalidCommand("PDU is not hexadecimal octets"));
    }
    if hex.len() > MAX_LINE {
        return Err(AtError::InvalidCommand("PDU too long"));
    }
    if tpdu_len == 0 || tpdu_len >= hex.len() / 2 {
        return Err(AtError::InvalidCommand("TPDU length does not fit the PDU"));
    }
    Ok(())
}

fn fields(info: &[String], prefix: &str) -> Option<Vec<String>> {
    let line = info.iter().find_map(|l| strip_prefix_ci(l, prefix))?;
    Some(line.split(',').map(|f| f.trim().to_string()).collect())
}

/// The message reference from the information lines of `AT+CMGS` (`+CMGS: <mr>`).
pub fn cmgs_reference(info: &[String]) -> Option<u8> {
    fields(info, "+CMGS:")?.first()?.parse().ok()
}

/// The registration status `<stat>` from `+CREG: <n>,<stat>[,...]` (1 home, 5 roaming).
pub fn creg_status(info: &[String]) -> Option<u8> {
    let f = fields(info, "+CREG:")?;
    let stat = if f.len() >= 2 { f.get(1)? } else { f.first()? };
    stat.parse().ok()
}

/// The SIM state from `+CPIN: <code>` (`READY`, `SIM PIN`, `SIM PUK`, ...).
pub fn cpin_status(info: &[String]) -> Option<String> {
    let line = info.iter().find_map(|l| strip_prefix_ci(l, "+CPIN:"))?;
    Some(line.trim().trim_matches('"').to_ascii_uppercase())
}

/// The signal quality `<rssi>` (0-31) from `+CSQ: <rssi>,<ber>`; 99 (unknown) is `None`.
pub fn csq_rssi(info: &[String]) -> Option<u8> {
    let rssi: u8 = fields(info, "+CSQ:")?.first()?.parse().ok()?;
    (rssi <= 31).then_some(rssi)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        command: Duration::from_secs(5),
        submit: Duration::from_secs(60),
    };
    const PDU: &str = "0011000B916407281553F80000AA0AE8329BFD4697D9EC37";

    fn submit() -> Command {
        Command::Submit {
            tpdu_len: PDU.len() / 2 - 1,
            hex: PDU.to_string(),
        }
    }

    fn ok(lines: &[&str]) -> Event {
        Event::Final(Ok(lines.iter().map(|s| s.to_string()).collect()))
    }

    fn urc(s: &str) -> Event {
        Event::Urc(s.to_string())
    }

    #[test]
    fn simple_command_with_info_line() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        assert_eq!(d.start(Command::line("AT+CSQ"), now).unwrap(), b"AT+CSQ\r");
        assert!(d.feed(b"\r\n+CSQ: 21,99\r\n", now).is_empty());
        let ev = d.feed(b"\r\nOK\r\n", now);
        assert_eq!(ev, vec![ok(&["+CSQ: 21,99"])]);
        assert!(d.is_idle());
        assert_eq!(csq_rssi(&["+CSQ: 21,99".to_string()]), Some(21));
        assert_eq!(csq_rssi(&["+CSQ: 99,99".to_string()]), None);
    }

    #[test]
    fn echo_is_ignored() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(Command::line("ATE0"), now).unwrap();
        assert_eq!(d.feed(b"ATE0\r\r\nOK\r\n", now), vec![ok(&[])]);
        d.start(submit(), now).unwrap();
        let mut ev = d.feed(b"AT+CMGS=23\r\r\n> ", now);
        assert_eq!(ev, vec![Event::Prompt]);
        let out = d.take_transmit().unwrap();
        assert_eq!(out.last(), Some(&CTRL_Z));
        ev = d.feed(&out, now); // the modem echoes the PDU and the ctrl-z
        assert!(ev.is_empty(), "{ev:?}");
        ev = d.feed(b"\r\n+CMGS: 7\r\n\r\nOK\r\n", now);
        assert_eq!(ev, vec![ok(&["+CMGS: 7"])]);
    }

    /// Modem output of a CMGS exchange with URCs before, inside and after it.
    fn cmgs_transcript() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"\r\n+CMTI: \"SM\",3\r\n");
        out.extend_from_slice(b"\r\n^RSSI:17\r\n");
        out.extend_from_slice(b"\r\n> ");
        out.extend_from_slice(b"\r\n+CREG: 1\r\n");
        out.extend_from_slice(b"\r\nRING\r\n");
        out.extend_from_slice(b"\r\n+CMT: ,24\r\n07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07\r\n");
        out.extend_from_slice(b"\r\n+CMGS: 42\r\n");
        out.extend_from_slice(b"\r\n^BOOT:12,0,0,0,0\r\n");
        out.extend_from_slice(b"\r\nOK\r\n");
        out.extend_from_slice(b"\r\n+CDSI: \"SR\",1\r\n");
        out.extend_from_slice(b"\r\n+CUSD: 0,\"Balance:\r\n5.00\",15\r\n");
        out
    }

    fn expected_cmgs_events() -> Vec<Event> {
        vec![
            urc("+CMTI: \"SM\",3"),
            urc("^RSSI:17"),
            Event::Prompt,
            urc("+CREG: 1"),
            urc("RING"),
            urc("+CMT: ,24\n07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07"),
            urc("^BOOT:12,0,0,0,0"),
            ok(&["+CMGS: 42"]),
            urc("+CDSI: \"SR\",1"),
            urc("+CUSD: 0,\"Balance:\n5.00\",15"),
        ]
    }

    #[test]
    fn urcs_before_inside_and_after_cmgs() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        assert_eq!(d.start(submit(), now).unwrap(), b"AT+CMGS=23\r");
        let ev = d.feed(&cmgs_transcript(), now);
        assert_eq!(ev, expected_cmgs_events());
        let out = d.take_transmit().unwrap();
        assert_eq!(&out[..out.len() - 1], PDU.as_bytes());
        assert_eq!(cmgs_reference(&["+CMGS: 42".to_string()]), Some(42));
    }

    #[test]
    fn chunk_split_gives_the_same_events() {
        let out = cmgs_transcript();
        let now = Instant::now();
        let expected = expected_cmgs_events();
        for split in 0..=out.len() {
            let mut d = Dialogue::new(T);
            d.start(submit(), now).unwrap();
            let mut ev = d.feed(&out[..split], now);
            ev.extend(d.feed(&out[split..], now));
            assert_eq!(ev, expected, "split at {split}");
        }
        let mut d = Dialogue::new(T);
        d.start(submit(), now).unwrap();
        let ev: Vec<Event> = out.iter().flat_map(|b| d.feed(&[*b], now)).collect();
        assert_eq!(ev, expected, "byte by byte");
    }

    #[test]
    fn solicited_and_unsolicited_creg() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(Command::line("AT+CREG?"), now).unwrap();
        let ev = d.feed(b"\r\n+CMTI: \"SM\",1\r\n\r\n+CREG: 0,5\r\n\r\nOK\r\n", now);
        assert_eq!(ev, vec![urc("+CMTI: \"SM\",1"), ok(&["+CREG: 0,5"])]);
        assert_eq!(creg_status(&["+CREG: 0,5".to_string()]), Some(5));
        assert_eq!(
            creg_status(&["+CREG: 2,1,\"00C3\",\"0010\"".to_string()]),
            Some(1)
        );
        // idle: everything is unsolicited
        let ev = d.feed(b"\r\n+CREG: 2\r\nCall Ready\r\n", now);
        assert_eq!(ev, vec![urc("+CREG: 2"), urc("Call Ready")]);
    }

    #[test]
    fn urc_with_the_same_prefix_as_an_info_line_of_another_command() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(Command::line("AT+CGSN"), now).unwrap();
        let ev = d.feed(b"\r\n356938035643809\r\n\r\nSMS Ready\r\n\r\nOK\r\n", now);
        assert_eq!(ev, vec![urc("SMS Ready"), ok(&["356938035643809"])]);
    }

    #[test]
    fn errors_numeric_and_verbose() {
        let cases: &[(&[u8], AtError)] = &[
            (b"\r\nERROR\r\n", AtError::Error),
            (b"\r\n+CMS ERROR: 500\r\n", AtError::Cms(500)),
            (b"\r\n+CMS ERROR: 515\r\n", AtError::Cms(515)),
            (
                b"\r\n+CMS ERROR: SMSC address unknown\r\n",
                AtError::Cms(330),
            ),
            (
                b"\r\n+CMS ERROR: no idea what happened\r\n",
                AtError::Cms(500),
            ),
            (b"\r\n+CME ERROR: 11\r\n", AtError::Cme(11)),
            (b"\r\n+CME ERROR: SIM PIN required\r\n", AtError::Cme(11)),
            (b"\r\n+CME ERROR: incorrect password\r\n", AtError::Cme(16)),
            (b"\r\n+CME ERROR: gremlins\r\n", AtError::Cme(100)),
        ];
        let now = Instant::now();
        for (out, err) in cases {
            let mut d = Dialogue::new(T);
            d.start(Command::line("AT+CPIN?"), now).unwrap();
            assert_eq!(d.feed(out, now), vec![Event::Final(Err(err.clone()))]);
        }
        // a +CMS ERROR instead of the prompt
        let mut d = Dialogue::new(T);
        d.start(submit(), now).unwrap();
        assert_eq!(
            d.feed(b"\r\n+CMS ERROR: 304\r\n", now),
            vec![Event::Final(Err(AtError::Cms(304)))]
        );
        assert!(d.take_transmit().is_none());
    }

    #[test]
    fn no_carrier_is_not_an_error_of_a_submit() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(submit(), now).unwrap();
        let ev = d.feed(
            b"\r\n> \r\nRING\r\n\r\nNO CARRIER\r\n\r\n+CMGS: 3\r\n\r\nOK\r\n",
            now,
        );
        assert_eq!(
            ev,
            vec![
                Event::Prompt,
                urc("RING"),
                urc("NO CARRIER"),
                ok(&["+CMGS: 3"])
            ]
        );
    }

    #[test]
    fn stray_final_results_while_idle_are_dropped() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        assert!(d.feed(b"\r\nOK\r\n\r\nERROR\r\n", now).is_empty());
        // but the end of a call is news, not a stray result
        assert_eq!(d.feed(b"\r\nNO CARRIER\r\n", now), vec![urc("NO CARRIER")]);
    }

    #[test]
    fn cmt_without_pdu_line_is_flushed() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(Command::line("AT"), now).unwrap();
        let ev = d.feed(b"\r\n+CMT: ,24\r\n\r\nOK\r\n", now);
        assert_eq!(ev, vec![urc("+CMT: ,24"), ok(&[])]);
    }

    #[test]
    fn timeouts_follow_the_phase() {
        let t0 = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(submit(), t0).unwrap();
        assert_eq!(d.next_deadline(), Some(t0 + T.command));
        assert_eq!(d.poll_timeout(t0 + Duration::from_secs(1)), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(d.feed(b"\r\n> ", t1), vec![Event::Prompt]);
        assert_eq!(d.next_deadline(), Some(t1 + T.submit));
        // the command timeout no longer applies once the PDU is out
        assert_eq!(d.poll_timeout(t0 + Duration::from_secs(10)), None);
        assert_eq!(
            d.poll_timeout(t1 + T.submit),
            Some(Event::Final(Err(AtError::Timeout)))
        );
        assert!(d.is_idle());
        assert!(d.start(Command::line("AT"), t1).is_ok());
    }

    #[test]
    fn submit_timeout_can_be_set_per_submit_and_survives_reset() {
        let t0 = Instant::now();
        let mut d = Dialogue::new(T);
        let short = Duration::from_secs(12);
        d.set_submit_timeout(short);
        d.reset();
        assert_eq!(d.timeouts().submit, short);
        d.start(submit(), t0).unwrap();
        assert_eq!(
            d.next_deadline(),
            Some(t0 + T.command),
            "the prompt wait is unchanged"
        );
        assert_eq!(d.feed(b"\r\n> ", t0), vec![Event::Prompt]);
        assert_eq!(d.next_deadline(), Some(t0 + short));
        // a change while the answer is awaited does not move the running deadline
        d.set_submit_timeout(T.submit);
        assert_eq!(
            d.poll_timeout(t0 + short),
            Some(Event::Final(Err(AtError::Timeout)))
        );
    }

    #[test]
    fn oversize_line_is_a_protocol_error_and_the_buffer_recovers() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        d.start(Command::line("AT+CSQ"), now).unwrap();
        let junk = vec![b'x'; MAX_LINE + 100];
        let ev = d.feed(&junk, now);
        assert_eq!(ev, vec![Event::Final(Err(AtError::LineTooLong))]);
        // the rest of the long line is discarded; the next command works
        d.start(Command::line("AT"), now).unwrap();
        let ev = d.feed(b"xxxx\r\nOK\r\n", now);
        assert_eq!(ev, vec![ok(&[])]);
        // idle overflow
        let ev = d.feed(&junk, now);
        assert_eq!(ev, vec![Event::Overflow]);
        assert_eq!(
            d.feed(b"\r\n+CMTI: \"SM\",2\r\n", now),
            vec![urc("+CMTI: \"SM\",2")]
        );
        // a line of exactly MAX_LINE bytes is fine
        let mut exact = vec![b'y'; MAX_LINE];
        exact.extend_from_slice(b"\r\n");
        assert_eq!(d.feed(&exact, now).len(), 1);
    }

    #[test]
    fn start_rejects_bad_commands_and_overlap() {
        let now = Instant::now();
        let mut d = Dialogue::new(T);
        assert!(matches!(
            d.start(Command::line("CSQ"), now),
            Err(AtError::InvalidCommand(_))
        ));
        assert!(matches!(
            d.start(Command::line("AT\r+CSQ"), now),
            Err(AtError::InvalidCommand(_))
        ));
        let bad = [
            (0, PDU.to_string()),
            (24, PDU.to_string()),
            (3, "0011zz".to_string()),
            (1, "001".to_string()),
        ];
        for (tpdu_len, hex) in bad {
            assert!(
                matches!(
                    d.start(Command::Submit { tpdu_len, hex }, now),
                    Err(AtError::InvalidCommand(_))
                ),
                "{tpdu_len}"
            );
        }
        d.start(Command::line("AT"), now).unwrap();
        assert_eq!(d.start(Command::line("AT"), now), Err(AtError::InProgress));
    }

    #[test]
    fn random_bytes_never_panic_and_the_dialogue_recovers() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"\r\n> +CMS ERROR:5OK\"^RSSI0123456789ABCDEF\x1a\xff";
        let t0 = Instant::now();
        let mut d = Dialogue::new(T);
        for round in 0..2000u32 {
            let now = t0 + Duration::from_millis(u64::from(round));
            if d.is_idle() {
                let cmd = if round % 3 == 0 {
                    submit()
                } else {
                    Command::line("AT+CREG?")
                };
                d.start(cmd, now).unwrap();
            }
            let len = rng.gen_range(0..200);
            let junk: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let _ = d.feed(&junk, now);
            let _ = d.take_transmit();
            let _ = d.poll_timeout(now + T.submit);
        }
        d.reset();
        d.start(Command::line("AT"), t0).unwrap();
        assert_eq!(d.feed(b"\r\nOK\r\n", t0), vec![ok(&[])]);
    }

    #[test]
    fn pin_is_redacted() {
        let c = Command::line("AT+CPIN=\"1234\"");
        assert!(!format!("{c:?}").contains("1234"));
        assert!(!c.redacted().contains("1234"));
        assert!(!format!("{:?}", submit()).contains(PDU));
        assert_eq!(
            cpin_status(&["+CPIN: SIM PIN".to_string()]).as_deref(),
            Some("SIM PIN")
        );
    }
}
