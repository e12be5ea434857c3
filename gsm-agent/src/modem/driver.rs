//! The serial-port actor: one std thread per modem owns the port and runs the AT dialogue.
//!
//! ```text
//! ModemHandle::submit ──mpsc(8)──▶ thread "modem-<name>" ──serialport──▶ /dev/ttyUSB0
//!        │  then rings ──eventfd──▶     │  sleeps in poll(2) on port + bell + next timer
//!        ▲                             │
//!        └─────────oneshot─────────────┘  status snapshots through a watch channel
//! ```
//!
//! An idle thread costs nothing: it sleeps in `poll(2)` until the port has bytes (a URC or an
//! answer), the bell rings (a request was queued, shutdown, the last handle went), or the next
//! timer is due — the idle probe every [`PROBE_EVERY`], a backoff, a command deadline, a
//! registration poll. A submit is picked up as soon as it is queued, not on a tick.
//!
//! The `AT+CMGS` deadline after the PDU is written follows the modem: `submit_timeout` is the
//! ceiling, and once the modem has [`MIN_SAMPLES`](super::submit_time::MIN_SAMPLES) successful
//! submits, the deadline is p99 × 3 of their durations, no lower than `submit_timeout_floor`
//! (see [`super::submit_time`]). The status shows the deadline in force.
//!
//! Life of the thread:
//!
//! ```text
//! open ─▶ init (ESC, AT, ATE0, AT+CMEE=1, AT+CMGF=0, AT+CPIN?[, AT+CPIN="…"], AT+CREG?, extras)
//!   ▲        │ ok                    │ SIM/registration problem        │ no answer / port error
//!   │        ▼                       ▼                                 ▼
//!   │      Ready: serve submits    Faulty(reason): backoff, re-init   close, Reopening: backoff
//!   │        │ timeout / network pause ─▶ Reinitialising (same port)          │
//!   └────────┴── port error, EOF, EIO (device gone) ◀─────────────────────────┘
//! ```
//!
//! Every command has a deadline; backoff doubles up to `reopen_backoff_max`. While the modem is
//! not serving, queued submits are answered at once with `NotReady` (or `Disconnected` when
//! the port is closed), so a caller never hangs on a dead modem. `+CMS ERROR: 515`-style busy
//! answers are retried a few times inside the driver. A rejected SIM PIN is never sent again by
//! this driver: three wrong tries would lock the SIM.
//!
//! Logging: `error!` (an alarm, with the modem name) when the port fails, the modem stops
//! answering or the SIM/network is unusable; `warn!` for failed extra init commands; `debug!`
//! per submit outcome; PDU hex, URCs and raw commands only at `trace!`. The PIN is never logged.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serialport::{ClearBuffer, DataBits, FlowControl, Parity, SerialPort, StopBits, TTYPort};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, trace, warn};

use super::at::{self, AtError, Command, Dialogue, Event, Timeouts};
use super::cms::{classify_cme, classify_cms, classify_plain_error, ErrorClass};
use super::submit_time::{self, SubmitTimes};

/// The serial port's own timeout: how long one write waits for room in the output buffer
/// (retried up to `command_timeout`). Reads happen only when `poll(2)` said bytes are there.
const PORT_TIMEOUT: Duration = Duration::from_millis(100);
/// Without a bell (no eventfd could be created) the thread looks at its queue this often.
const NO_BELL_TICK: Duration = Duration::from_millis(20);
/// Requests waiting for the thread.
const QUEUE: usize = 8;
/// An idle modem is probed (`AT+CSQ`) this often, to notice a hang and refresh the signal.
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// First reopen / re-init delay (capped by `reopen_backoff_max`).
const BACKOFF_START: Duration = Duration::from_millis(500);
/// `AT+CREG?` polls before a modem that is not registered is declared not ready.
const REGISTRATION_POLLS: u32 = 8;

/// One modem's settings.
#[derive(Clone)]
pub struct ModemConfig {
    /// Name in logs, status and receipts.
    pub name: String,
    /// The serial device, e.g. `/dev/ttyUSB2` or a stable `/dev/serial/by-id/...` link.
    pub device: PathBuf,
    /// Baud rate (115200).
    pub baud: u32,
    /// SIM PIN, sent once if the SIM asks for it. Never logged.
    pub pin: Option<String>,
    /// Deadline of an ordinary command (5 s).
    pub command_timeout: Duration,
    /// The longest deadline of `AT+CMGS` once the PDU is written, while the modem waits for
    /// the SMSC (60 s). The deadline in force is derived from the modem's recent submit times
    /// and is at most this (see [`super::submit_time`]).
    pub submit_timeout: Duration,
    /// The shortest derived `AT+CMGS` deadline (10 s).
    pub submit_timeout_floor: Duration,
    /// Extra commands sent at the end of initialisation (e.g. `AT+CMMS=1`).
    pub init_commands: Vec<String>,
    /// Upper bound of the reopen / re-init backoff.
    pub reopen_backoff_max: Duration,
}

impl ModemConfig {
    /// A configuration with the defaults for `device`.
    pub fn new(name: impl Into<String>, device: impl Into<PathBuf>) -> Self {
        ModemConfig {
            name: name.into(),
            device: device.into(),
            baud: 115_200,
            pin: None,
            command_timeout: Duration::from_secs(5),
            submit_timeout: Duration::from_secs(60),
            submit_timeout_floor: submit_time::DEFAULT_FLOOR,
            init_commands: Vec::new(),
            reopen_backoff_max: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for ModemConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModemConfig")
            .field("name", &self.name)
            .field("device", &self.device)
            .field("baud", &self.baud)
            .field("pin", &self.pin.as_ref().map(|_| "<redacted>"))
            .field("command_timeout", &self.command_timeout)
            .field("submit_timeout", &self.submit_timeout)
            .field("submit_timeout_floor", &self.submit_timeout_floor)
            .field("init_commands", &self.init_commands)
            .field("reopen_backoff_max", &self.reopen_backoff_max)
            .finish()
    }
}

/// What the driver thread is doing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub enum ModemState {
    /// Opening the port and running the init sequence for the first time.
    Initialising,
    /// Sending.
    Ready,
    /// Running the init sequence again on the open port (after a timeout or network pause).
    Reinitialising,
    /// The port is closed; it is reopened after a backoff.
    Reopening,
    /// The modem answers but cannot send (SIM, PIN, registration); retried after a backoff.
    Faulty(String),
    /// The thread has ended.
    Stopped,
}

/// A snapshot of one modem, for the pool, the status endpoint and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ModemStatus {
    pub name: String,
    pub state: ModemState,
    /// PDUs the SMSC accepted.
    pub sent: u64,
    /// Submissions that failed.
    pub failed: u64,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// `+CSQ` rssi (0-31), if known.
    pub signal: Option<u8>,
    /// Successful initialisations so far; a re-init after a fault counts too.
    pub inits: u64,
    /// The `AT+CMGS` deadline now in force, from PDU written to answer, in milliseconds:
    /// `submit_timeout` until the modem has enough successful submits, then derived from
    /// their durations (see [`super::submit_time`]).
    pub submit_timeout_ms: u64,
    /// The 99th percentile of the recent submit durations, in milliseconds, once there are
    /// enough of them to derive the deadline.
    pub submit_p99_ms: Option<u64>,
}

/// The message references of an accepted submission, one per PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitReceipt {
    pub message_refs: Vec<u8>,
}

/// What went wrong with a submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitErrorKind {
    /// `+CMS ERROR: <n>`.
    #[error("+CMS ERROR: {0}")]
    Cms(u16),
    /// `+CME ERROR: <n>`.
    #[error("+CME ERROR: {0}")]
    Cme(u16),
    /// A plain `ERROR`.
    #[error("modem answered ERROR")]
    Error,
    /// No usable final result before the deadline.
    #[error("modem did not answer in time")]
    Timeout,
    /// The port failed or closed during the submission, or the driver is gone.
    #[error("modem port disconnected")]
    Disconnected,
    /// The modem is not serving (initialising, faulty, reopening).
    #[error("modem not ready")]
    NotReady,
    /// The PDU was refused before anything was written (bad hex or length).
    #[error("invalid PDU")]
    InvalidPdu,
}

impl SubmitErrorKind {
    /// The class the pool and the dispatcher act on.
    pub fn class(&self) -> ErrorClass {
        match *self {
            SubmitErrorKind::Cms(n) => classify_cms(n),
            SubmitErrorKind::Cme(n) => classify_cme(n),
            SubmitErrorKind::Error => classify_plain_error(),
            SubmitErrorKind::Timeout
            | SubmitErrorKind::Disconnected
            | SubmitErrorKind::NotReady => ErrorClass::ModemFault,
            SubmitErrorKind::InvalidPdu => ErrorClass::Bug,
        }
    }
}

/// A failed submission.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("submit failed after {parts_sent} part(s): {kind}")]
pub struct SubmitError {
    pub kind: SubmitErrorKind,
    pub class: ErrorClass,
    /// Parts the SMSC accepted before the failing one.
    pub parts_sent: usize,
    /// The failing part's PDU was written and no final result came back (timeout,
    /// disconnect): it may have been sent. Do not resend blindly.
    pub maybe_sent: bool,
}

impl SubmitError {
    /// An error of `kind` with its default class.
    pub fn new(kind: SubmitErrorKind, parts_sent: usize, maybe_sent: bool) -> Self {
        SubmitError {
            kind,
            class: kind.class(),
            parts_sent,
            maybe_sent,
        }
    }
}

enum Request {
    Submit {
        pdus: Vec<(usize, String)>,
        reply: oneshot::Sender<Result<SubmitReceipt, SubmitError>>,
    },
}

/// The way to one modem's thread. Cheap to clone; the thread ends when [`ModemHandle::shutdown`]
/// is called or every handle is dropped.
#[derive(Clone)]
pub struct ModemHandle {
    name: Arc<str>,
    tx: mpsc::Sender<Request>,
    status: watch::Receiver<ModemStatus>,
    stop: Arc<AtomicBool>,
    bell: Option<Arc<Bell>>,
    /// Declared after `tx`: dropped after it, so the last ring finds the queue closed.
    _last: Arc<LastHandle>,
}

/// Wakes the modem thread out of `poll(2)`: an eventfd rung after a request is queued, on
/// shutdown and when the last handle goes. The thread drains it before it looks at its queue
/// and flags again, so a ring is never lost.
struct Bell(EventFd);

impl Bell {
    fn new() -> nix::Result<Bell> {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map(Bell)
    }

    fn ring(&self) {
        // Fails (EAGAIN) only when the counter is saturated: it is ringing already.
        let _ = self.0.write(1);
    }

    fn drain(&self) {
        // EAGAIN when nobody rang.
        let _ = self.0.read();
    }
}

/// Shared by all clones of one handle: when the last one goes, the thread is woken to find
/// its queue closed, and ends.
struct LastHandle(Option<Arc<Bell>>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        if let Some(bell) = &self.0 {
            bell.ring();
        }
    }
}

impl std::fmt::Debug for ModemHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModemHandle")
            .field("name", &self.name)
            .finish()
    }
}

/// Starts the thread for `cfg` and returns its handle.
pub fn spawn(cfg: ModemConfig) -> ModemHandle {
    let (tx, rx) = mpsc::channel(QUEUE);
    let initial = ModemStatus {
        name: cfg.name.clone(),
        state: ModemState::Initialising,
        sent: 0,
        failed: 0,
        last_error: None,
        signal: None,
        inits: 0,
        submit_timeout_ms: millis(cfg.submit_timeout),
        submit_p99_ms: None,
    };
    let (status_tx, status_rx) = watch::channel(initial);
    let stop = Arc::new(AtomicBool::new(false));
    let name: Arc<str> = Arc::from(cfg.name.as_str());
    let bell = match Bell::new() {
        Ok(bell) => Some(Arc::new(bell)),
        Err(e) => {
            error!(modem = %name, "cannot create the wake-up eventfd ({e}); the modem thread polls its queue every {NO_BELL_TICK:?}");
            None
        }
    };
    let driver = Driver::new(cfg, rx, status_tx, stop.clone(), bell.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("modem-{name}"))
        .spawn(move || driver.run());
    if let Err(e) = spawned {
        // The driver (and with it the receiver and the status sender) is gone: every submit
        // answers Disconnected and the state reads as the initial one.
        error!(modem = %name, "cannot start the modem thread: {e}");
    }
    ModemHandle {
        name,
        tx,
        status: status_rx,
        stop,
        _last: Arc::new(LastHandle(bell.clone())),
        bell,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The port's descriptor, for `poll(2)`, borrowed for as long as the port.
#[allow(unsafe_code)]
fn port_fd(port: &TTYPort) -> BorrowedFd<'_> {
    // SAFETY: the TTYPort owns this open descriptor and closes it only when dropped; the
    // borrow is tied to `port`, so it cannot outlive it. (serialport has no `AsFd` yet.)
    unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) }
}

/// The `poll(2)` timeout until `until`, rounded up to the millisecond: waking early would
/// spin until the deadline.
fn poll_timeout(until: Option<Instant>, now: Instant) -> PollTimeout {
    let Some(until) = until else {
        return PollTimeout::NONE;
    };
    let ms = until
        .saturating_duration_since(now)
        .as_nanos()
        .div_ceil(1_000_000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

impl ModemHandle {
    /// The modem's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends the PDUs (`(tpdu_len, hex)`, one per part) in order and returns their message
    /// references. Stops at the first failing part.
    pub async fn submit(&self, pdus: Vec<(usize, String)>) -> Result<SubmitReceipt, SubmitError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Request::Submit { pdus, reply }).await.is_err() {
            return Err(SubmitError::new(SubmitErrorKind::Disconnected, 0, false));
        }
        self.ring();
        match answer.await {
            Ok(result) => result,
            // The thread died holding the request: it may have written the PDU.
            Err(_) => Err(SubmitError::new(SubmitErrorKind::Disconnected, 0, true)),
        }
    }

    fn ring(&self) {
        if let Some(bell) = &self.bell {
            bell.ring();
        }
    }

    /// The current state.
    pub fn state(&self) -> ModemState {
        self.status.borrow().state.clone()
    }

    /// A snapshot of state and counters.
    pub fn status(&self) -> ModemStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (for `wait_for`).
    pub fn subscribe(&self) -> watch::Receiver<ModemStatus> {
        self.status.clone()
    }

    /// Waits until the state satisfies `pred` or `within` passes; returns the last status.
    pub async fn wait_for_state(
        &self,
        within: Duration,
        mut pred: impl FnMut(&ModemState) -> bool,
    ) -> Result<ModemStatus, ModemStatus> {
        let mut rx = self.status.clone();
        let waited = tokio::time::timeout(within, rx.wait_for(|s| pred(&s.state))).await;
        match waited {
            Ok(Ok(status)) => Ok(status.clone()),
            _ => Err(self.status()),
        }
    }

    /// Stops the thread, closes the port, and waits until the thread has ended. Queued
    /// submits are answered `Disconnected`.
    pub async fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.ring();
        let mut rx = self.status.clone();
        let _ = rx.wait_for(|s| s.state == ModemState::Stopped).await;
    }
}

/// Why a command did not complete.
enum Fail {
    Stopped,
    Port(io::Error),
    At(AtError),
}

enum InitError {
    Fail(Fail),
    NotReady(String),
}

impl From<Fail> for InitError {
    fn from(f: Fail) -> Self {
        InitError::Fail(f)
    }
}

/// What the serve loop hands back to the main loop.
enum Next {
    Stopped,
    Reinit(String),
    Reopen(String),
    Faulty(String),
}

struct Driver {
    cfg: ModemConfig,
    rx: mpsc::Receiver<Request>,
    status: watch::Sender<ModemStatus>,
    stop: Arc<AtomicBool>,
    bell: Option<Arc<Bell>>,
    port: Option<TTYPort>,
    dialogue: Dialogue,
    backoff: Duration,
    pin_rejected: bool,
    /// The PDU of the running submit has been (at least partly) written.
    pdu_written: bool,
    /// When the running submit's prompt came and its PDU was written.
    pdu_written_at: Option<Instant>,
    /// Recent submit durations and the `AT+CMGS` deadline they give.
    times: SubmitTimes,
    /// Serving submits; otherwise queued requests are refused at once.
    serving: bool,
    /// The class given to refused requests (network problems are not SIM problems).
    not_ready_class: ErrorClass,
    buf: Vec<u8>,
}

impl Driver {
    fn new(
        cfg: ModemConfig,
        rx: mpsc::Receiver<Request>,
        status: watch::Sender<ModemStatus>,
        stop: Arc<AtomicBool>,
        bell: Option<Arc<Bell>>,
    ) -> Self {
        let timeouts = Timeouts {
            command: cfg.command_timeout,
            submit: cfg.submit_timeout,
        };
        let backoff = BACKOFF_START.min(cfg.reopen_backoff_max);
        let times = SubmitTimes::new(cfg.submit_timeout_floor, cfg.submit_timeout);
        Driver {
            cfg,
            rx,
            status,
            stop,
            bell,
            port: None,
            dialogue: Dialogue::new(timeouts),
            backoff,
            pin_rejected: false,
            pdu_written: false,
            pdu_written_at: None,
            times,
            serving: false,
            not_ready_class: ErrorClass::ModemFault,
            buf: vec![0; 1024],
        }
    }

    fn run(mut self) {
        let mut reinit = false;
        loop {
            if self.stopping() {
                break;
            }
            if self.port.is_none() {
                match self.open() {
                    Ok(port) => {
                        info!(modem = %self.cfg.name, device = %self.cfg.device.display(), "port open");
                        self.port = Some(port);
                        self.dialogue.reset();
                        reinit = false;
                    }
                    Err(e) => {
                        let msg = format!("cannot open {}: {e}", self.cfg.device.display());
                        self.alarm(&msg);
                        self.set_state(ModemState::Reopening);
                        if !self.backoff_wait() {
                            break;
                        }
                        continue;
                    }
                }
            }
            self.set_state(if reinit {
                ModemState::Reinitialising
            } else {
                ModemState::Initialising
            });
            match self.init() {
                Ok(()) => {
                    self.backoff = BACKOFF_START.min(self.cfg.reopen_backoff_max);
                    self.status.send_modify(|s| {
                        s.inits += 1;
                        s.state = ModemState::Ready;
                    });
                    info!(modem = %self.cfg.name, "modem ready");
                }
                Err(InitError::Fail(Fail::Stopped)) => break,
                Err(InitError::Fail(Fail::Port(e))) => {
                    self.reopen_later(&format!("port failed during init: {e}"));
                    if !self.backoff_wait() {
                        break;
                    }
                    continue;
                }
                Err(InitError::Fail(Fail::At(e))) => {
                    self.reopen_later(&format!("modem does not answer during init: {e}"));
                    if !self.backoff_wait() {
                        break;
                    }
                    continue;
                }
                Err(InitError::NotReady(reason)) => {
                    self.alarm(&format!("modem not ready: {reason}"));
                    self.set_state(ModemState::Faulty(reason));
                    reinit = true;
                    if !self.backoff_wait() {
                        break;
                    }
                    continue;
                }
            }
            self.serving = true;
            let next = self.serve();
            self.serving = false;
            match next {
                Next::Stopped => break,
                Next::Reinit(reason) => {
                    warn!(modem = %self.cfg.name, "re-initialising: {reason}");
                    reinit = true;
                }
                Next::Reopen(reason) => {
                    self.reopen_later(&reason);
                    if !self.backoff_wait() {
                        break;
                    }
                }
                Next::Faulty(reason) => {
                    self.alarm(&format!("modem taken out of service: {reason}"));
                    self.set_state(ModemState::Faulty(reason));
                    reinit = true;
                    if !self.backoff_wait() {
                        break;
                    }
                }
            }
        }
        self.port = None;
        self.rx.close();
        while let Ok(Request::Submit { reply, .. }) = self.rx.try_recv() {
            let _ = reply.send(Err(SubmitError::new(
                SubmitErrorKind::Disconnected,
                0,
                false,
            )));
        }
        self.set_state(ModemState::Stopped);
        debug!(modem = %self.cfg.name, "modem thread ended");
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn alarm(&self, msg: &str) {
        error!(modem = %self.cfg.name, "{msg}");
        self.status
            .send_modify(|s| s.last_error = Some(msg.to_string()));
    }

    fn set_state(&self, state: ModemState) {
        self.status.send_if_modified(|s| {
            if s.state == state {
                false
            } else {
                s.state = state;
                true
            }
        });
    }

    fn reopen_later(&mut self, reason: &str) {
        self.alarm(&format!("{reason}; closing the port and reopening"));
        self.port = None;
        self.set_state(ModemState::Reopening);
    }

    fn open(&self) -> Result<TTYPort, serialport::Error> {
        let port = serialport::new(self.cfg.device.to_string_lossy(), self.cfg.baud)
            .data_bits(DataBits::Eight)
            .parity(Parity::None)
            .stop_bits(StopBits::One)
            .flow_control(FlowControl::None)
            .timeout(PORT_TIMEOUT)
            .open_native()?;
        // Whatever the modem said before we came is not an answer to us.
        let _ = port.clear(ClearBuffer::All);
        Ok(port)
    }

    /// Waits out the current backoff (then doubles it), refusing requests meanwhile. Returns
    /// false when the thread should end.
    fn backoff_wait(&mut self) -> bool {
        let until = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.cfg.reopen_backoff_max);
        while Instant::now() < until {
            if self.stopping() || self.refuse_requests().is_err() {
                return false;
            }
            if self.port.is_some() {
                match self.read_until(Some(until)) {
                    Ok(n) => self.absorb(n),
                    Err(_) => self.port = None,
                }
            } else if let Err(e) = self.wait(Some(until)) {
                // Only the bell is watched, and poll(2) failed on it: sleep, do not spin.
                warn!(modem = %self.cfg.name, "poll failed: {e}");
                std::thread::sleep(NO_BELL_TICK);
            }
        }
        !self.stopping()
    }

    /// Answers every queued request with NotReady/Disconnected. Err when all handles are gone.
    fn refuse_requests(&mut self) -> Result<(), ()> {
        loop {
            match self.rx.try_recv() {
                Ok(Request::Submit { reply, .. }) => {
                    let kind = if self.port.is_none() {
                        SubmitErrorKind::Disconnected
                    } else {
                        SubmitErrorKind::NotReady
                    };
                    let mut err = SubmitError::new(kind, 0, false);
                    if kind == SubmitErrorKind::NotReady {
                        err.class = self.not_ready_class;
                    }
                    debug!(modem = %self.cfg.name, "refusing a submit: {kind}");
                    let _ = reply.send(Err(err));
                }
                Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(()),
            }
        }
    }

    // ---- port I/O -----------------------------------------------------------------------

    /// Sleeps in `poll(2)` until the port (if open) has bytes or hung up, the bell rings, or
    /// `until` passes (`None`: no timer). Returns true when the port is ready to be read. A
    /// ring is drained here: the caller loops back to its queue and flags.
    fn wait(&mut self, until: Option<Instant>) -> io::Result<bool> {
        let mut until = until;
        if self.bell.is_none() {
            let tick = Instant::now() + NO_BELL_TICK;
            until = Some(until.map_or(tick, |u| u.min(tick)));
        }
        let timeout = poll_timeout(until, Instant::now());
        let mut fds = Vec::with_capacity(2);
        if let Some(port) = &self.port {
            fds.push(PollFd::new(port_fd(port), PollFlags::POLLIN));
        }
        if let Some(bell) = &self.bell {
            fds.push(PollFd::new(bell.0.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => return Err(io::Error::from(e)),
        }
        let ready =
            |fd: Option<&PollFd>| fd.and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
        let (port_ready, bell_rang) = match (&self.port, &self.bell) {
            (Some(_), Some(_)) => (ready(fds.first()), ready(fds.get(1))),
            (Some(_), None) => (ready(fds.first()), false),
            (None, Some(_)) => (false, ready(fds.first())),
            (None, None) => (false, false),
        };
        drop(fds);
        if bell_rang {
            if let Some(bell) = &self.bell {
                bell.drain();
            }
        }
        Ok(port_ready)
    }

    /// Waits as [`Driver::wait`] does, then reads what the port has; Ok(0) when the wait
    /// ended without bytes (a ring or the timer).
    fn read_until(&mut self, until: Option<Instant>) -> Result<usize, Fail> {
        if self.port.is_none() {
            return Err(Fail::Port(io::Error::new(
                io::ErrorKind::NotConnected,
                "port is closed",
            )));
        }
        if !self.wait(until).map_err(Fail::Port)? {
            return Ok(0);
        }
        let Some(port) = self.port.as_mut() else {
            return Err(Fail::Port(io::Error::new(
                io::ErrorKind::NotConnected,
                "port is closed",
            )));
        };
        match port.read(&mut self.buf) {
            Ok(0) => Err(Fail::Port(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "device closed",
            ))),
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(Fail::Port(e)),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        let deadline = Instant::now() + self.cfg.command_timeout;
        let Some(port) = self.port.as_mut() else {
            return Err(Fail::Port(io::Error::new(
                io::ErrorKind::NotConnected,
                "port is closed",
            )));
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            match port.write(rest) {
                Ok(0) => {
                    return Err(Fail::Port(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device takes no more bytes",
                    )))
                }
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(Fail::At(AtError::Timeout));
                    }
                }
                Err(e) => return Err(Fail::Port(e)),
            }
        }
        Ok(())
    }

    /// Feeds `n` read bytes to an idle dialogue (URCs only).
    fn absorb(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let events = self.dialogue.feed(&self.buf[..n], Instant::now());
        for ev in events {
            match ev {
                Event::Urc(u) => self.on_urc(&u),
                Event::Overflow => warn!(modem = %self.cfg.name, "modem sent an overlong line"),
                Event::Prompt | Event::Final(_) => {}
            }
        }
    }

    fn on_urc(&mut self, urc: &str) {
        // URCs can carry phone numbers (+CMT, +CLIP): trace only.
        trace!(modem = %self.cfg.name, urc, "unsolicited");
        if let Some(rest) = urc.strip_prefix("^RSSI:") {
            if let Ok(rssi) = rest.trim().parse::<u8>() {
                let signal = (rssi <= 31).then_some(rssi);
                self.status.send_if_modified(|s| {
                    let changed = s.signal != signal;
                    s.signal = signal;
                    changed
                });
            }
        }
    }

    /// Reads and feeds for `d`, handling URCs (a pause that keeps the line drained).
    fn pause(&mut self, d: Duration) -> Result<(), Fail> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.stopping() {
                return Err(Fail::Stopped);
            }
            let n = self.read_until(Some(until))?;
            self.absorb(n);
        }
        Ok(())
    }

    /// Runs one command to its final result.
    fn exec(&mut self, cmd: Command) -> Result<Vec<String>, Fail> {
        trace!(modem = %self.cfg.name, command = ?cmd, "command");
        self.pdu_written = false;
        self.pdu_written_at = None;
        let bytes = self.dialogue.start(cmd, Instant::now()).map_err(Fail::At)?;
        self.write(&bytes)?;
        loop {
            if self.stopping() {
                self.dialogue.reset();
                return Err(Fail::Stopped);
            }
            if !self.serving && self.refuse_requests().is_err() {
                self.stop.store(true, Ordering::SeqCst);
            }
            let n = self.read_until(self.dialogue.next_deadline())?;
            let mut result = None;
            if n > 0 {
                let now = Instant::now();
                let events = self.dialogue.feed(&self.buf[..n], now);
                for ev in events {
                    match ev {
                        Event::Prompt => {
                            if let Some(out) = self.dialogue.take_transmit() {
                                self.pdu_written = true;
                                self.pdu_written_at = Some(now);
                                self.write(&out)?;
                            }
                        }
                        Event::Final(r) => result = Some(r),
                        Event::Urc(u) => self.on_urc(&u),
                        Event::Overflow => {
                            warn!(modem = %self.cfg.name, "modem sent an overlong line")
                        }
                    }
                }
            }
            if result.is_none() {
                if let Some(Event::Final(r)) = self.dialogue.poll_timeout(Instant::now()) {
                    result = Some(r);
                }
            }
            if let Some(r) = result {
                return r.map_err(Fail::At);
            }
        }
    }

    // ---- init -----------------------------------------------------------------------------

    fn init(&mut self) -> Result<(), InitError> {
        self.dialogue.reset();
        self.not_ready_class = ErrorClass::ModemFault;
        // Leave a PDU prompt a previous run may have left open, and drop stale output.
        self.write(at::CANCEL)?;
        self.pause(Duration::from_millis(60))?;
        let mut alive = false;
        for _ in 0..3 {
            match self.exec(Command::line("AT")) {
                Ok(_) => {
                    alive = true;
                    break;
                }
                Err(Fail::At(_)) => continue,
                Err(f) => return Err(f.into()),
            }
        }
        if !alive {
            return Err(Fail::At(AtError::Timeout).into());
        }
        // Answers to commands that timed out earlier may still be on their way: let them
        // arrive while idle, where stray final results are dropped, so they are not taken
        // for the answers of the commands below.
        self.pause(self.poll_interval())?;
        for cmd in ["ATE0", "AT+CMEE=1", "AT+CMGF=0"] {
            self.simple(cmd)?;
        }
        self.check_sim()?;
        self.check_registration()?;
        for cmd in self.cfg.init_commands.clone() {
            let redacted = Command::line(cmd.as_str()).redacted();
            match self.exec(Command::line(cmd)) {
                Ok(_) => {}
                Err(Fail::At(AtError::Timeout)) => return Err(Fail::At(AtError::Timeout).into()),
                Err(Fail::At(e)) => {
                    warn!(modem = %self.cfg.name, command = %redacted, "extra init command failed: {e}")
                }
                Err(f) => return Err(f.into()),
            }
        }
        self.refresh_signal()?;
        Ok(())
    }

    /// A command that must succeed; an error answer means the modem is not usable.
    fn simple(&mut self, cmd: &str) -> Result<Vec<String>, InitError> {
        match self.exec(Command::line(cmd)) {
            Ok(info) => Ok(info),
            Err(Fail::At(AtError::Timeout)) => Err(Fail::At(AtError::Timeout).into()),
            Err(Fail::At(e)) => Err(InitError::NotReady(format!(
                "{} failed: {e}",
                Command::line(cmd).redacted()
            ))),
            Err(f) => Err(f.into()),
        }
    }

    fn check_sim(&mut self) -> Result<(), InitError> {
        let info = match self.exec(Command::line("AT+CPIN?")) {
            Ok(info) => info,
            Err(Fail::At(AtError::Cme(10) | AtError::Cms(310))) => {
                return Err(InitError::NotReady("SIM not inserted".into()))
            }
            Err(Fail::At(AtError::Timeout)) => return Err(Fail::At(AtError::Timeout).into()),
            Err(Fail::At(e)) => return Err(InitError::NotReady(format!("AT+CPIN? failed: {e}"))),
            Err(f) => return Err(f.into()),
        };
        match at::cpin_status(&info).as_deref() {
            Some("READY") => Ok(()),
            Some("SIM PIN") => self.unlock(),
            Some(other) => Err(InitError::NotReady(format!("SIM asks for {other}"))),
            None => Err(InitError::NotReady("no +CPIN answer".into())),
        }
    }

    fn unlock(&mut self) -> Result<(), InitError> {
        if self.pin_rejected {
            return Err(InitError::NotReady(
                "SIM PIN was rejected before; not trying again (the SIM would lock)".into(),
            ));
        }
        let Some(pin) = self.cfg.pin.clone() else {
            return Err(InitError::NotReady(
                "SIM asks for a PIN and none is configured".into(),
            ));
        };
        if !(4..=8).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InitError::NotReady(
                "configured SIM PIN is not 4 to 8 digits".into(),
            ));
        }
        match self.exec(Command::line(format!("AT+CPIN=\"{pin}\""))) {
            Ok(_) => {}
            Err(Fail::At(AtError::Timeout)) => return Err(Fail::At(AtError::Timeout).into()),
            Err(Fail::At(e)) => {
                self.pin_rejected = true;
                return Err(InitError::NotReady(format!(
                    "SIM PIN rejected ({e}); not trying again (the SIM would lock)"
                )));
            }
            Err(f) => return Err(f.into()),
        }
        info!(modem = %self.cfg.name, "SIM unlocked");
        // The SIM takes a moment after the PIN: wait for READY.
        let interval = self.poll_interval();
        for _ in 0..REGISTRATION_POLLS {
            match self.exec(Command::line("AT+CPIN?")) {
                Ok(info) if at::cpin_status(&info).as_deref() == Some("READY") => return Ok(()),
                Ok(_) | Err(Fail::At(AtError::Cme(14))) => {}
                Err(Fail::At(AtError::Timeout)) => return Err(Fail::At(AtError::Timeout).into()),
                Err(Fail::At(e)) => return Err(InitError::NotReady(format!("SIM after PIN: {e}"))),
                Err(f) => return Err(f.into()),
            }
            self.pause(interval)?;
        }
        Err(InitError::NotReady("SIM not ready after the PIN".into()))
    }

    fn poll_interval(&self) -> Duration {
        (self.cfg.command_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(2))
    }

    fn check_registration(&mut self) -> Result<(), InitError> {
        let interval = self.poll_interval();
        let mut last = None;
        for attempt in 0..REGISTRATION_POLLS {
            if attempt > 0 {
                self.pause(interval)?;
            }
            let info = self.simple("AT+CREG?")?;
            last = at::creg_status(&info);
            if matches!(last, Some(1 | 5)) {
                return Ok(());
            }
        }
        self.not_ready_class = ErrorClass::NetworkPause;
        Err(InitError::NotReady(match last {
            Some(stat) => format!("not registered to the network (+CREG stat {stat})"),
            None => "no +CREG answer".to_string(),
        }))
    }

    fn refresh_signal(&mut self) -> Result<(), Fail> {
        match self.exec(Command::line("AT+CSQ")) {
            Ok(info) => {
                let signal = at::csq_rssi(&info);
                self.status.send_if_modified(|s| {
                    let changed = s.signal != signal;
                    s.signal = signal;
                    changed
                });
                Ok(())
            }
            Err(Fail::At(AtError::Timeout)) => Err(Fail::At(AtError::Timeout)),
            Err(Fail::At(_)) => Ok(()),
            Err(f) => Err(f),
        }
    }

    // ---- serving ----------------------------------------------------------------------------

    fn serve(&mut self) -> Next {
        let mut last_activity = Instant::now();
        loop {
            if self.stopping() {
                return Next::Stopped;
            }
            match self.rx.try_recv() {
                Ok(Request::Submit { pdus, reply }) => {
                    let (result, next) = self.submit(pdus);
                    self.status.send_modify(|s| match &result {
                        Ok(receipt) => s.sent += receipt.message_refs.len() as u64,
                        Err(e) => {
                            s.sent += e.parts_sent as u64;
                            s.failed += 1;
                            s.last_error = Some(e.to_string());
                        }
                    });
                    // Leave Ready before answering, so no caller sees a stale Ready.
                    match &next {
                        Some(Next::Reinit(_)) => self.set_state(ModemState::Reinitialising),
                        Some(Next::Reopen(_)) => self.set_state(ModemState::Reopening),
                        Some(Next::Faulty(reason)) => {
                            self.set_state(ModemState::Faulty(reason.clone()))
                        }
                        Some(Next::Stopped) | None => {}
                    }
                    let _ = reply.send(result);
                    if let Some(next) = next {
                        return next;
                    }
                    last_activity = Instant::now();
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Asleep until a URC, a request (the bell) or the probe is due.
                    match self.read_until(Some(last_activity + PROBE_EVERY)) {
                        Ok(n) => self.absorb(n),
                        Err(Fail::Port(e)) => return Next::Reopen(format!("port failed: {e}")),
                        Err(_) => return Next::Stopped,
                    }
                    if last_activity.elapsed() >= PROBE_EVERY {
                        last_activity = Instant::now();
                        match self.refresh_signal() {
                            Ok(()) => {}
                            Err(Fail::At(e)) => return Next::Reinit(format!("idle probe: {e}")),
                            Err(Fail::Port(e)) => return Next::Reopen(format!("port failed: {e}")),
                            Err(Fail::Stopped) => return Next::Stopped,
                        }
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Next::Stopped,
            }
        }
    }

    /// Feeds one part's outcome to the submit-time window: an accepted PDU is a sample; a
    /// PDU that got no answer in time makes the window start over (see `submit_time`).
    fn learn_submit_time(&mut self, result: &Result<Vec<String>, Fail>) {
        match (result, self.pdu_written_at) {
            (Ok(_), Some(written)) => self.times.record(written.elapsed()),
            (Err(Fail::At(AtError::Timeout)), Some(_)) => {
                if self.times.p99().is_some() {
                    warn!(modem = %self.cfg.name, timeout = ?self.times.timeout(), "no answer within the derived submit timeout; back to the ceiling until the modem has shown its times again");
                }
                self.times.forget();
            }
            _ => return,
        }
        let timeout_ms = millis(self.times.timeout());
        let p99_ms = self.times.p99().map(millis);
        self.status.send_if_modified(|s| {
            let changed = s.submit_timeout_ms != timeout_ms || s.submit_p99_ms != p99_ms;
            s.submit_timeout_ms = timeout_ms;
            s.submit_p99_ms = p99_ms;
            changed
        });
    }

    /// Sends the parts in order. Returns the outcome and, if the modem needs attention, what
    /// the main loop should do next.
    fn submit(
        &mut self,
        pdus: Vec<(usize, String)>,
    ) -> (Result<SubmitReceipt, SubmitError>, Option<Next>) {
        let busy = ErrorClass::Busy.retry_policy();
        let mut refs = Vec::with_capacity(pdus.len());
        let total = pdus.len();
        for (i, (tpdu_len, hex)) in pdus.into_iter().enumerate() {
            let mut attempt = 1;
            loop {
                trace!(modem = %self.cfg.name, part = i + 1, tpdu_len, pdu = %hex, "submit");
                let cmd = Command::Submit {
                    tpdu_len,
                    hex: hex.clone(),
                };
                self.dialogue.set_submit_timeout(self.times.timeout());
                let result = self.exec(cmd);
                self.learn_submit_time(&result);
                let (kind, next) = match result {
                    Ok(info) => {
                        let mr = at::cmgs_reference(&info).unwrap_or_else(|| {
                            warn!(modem = %self.cfg.name, "OK without +CMGS reference");
                            0
                        });
                        refs.push(mr);
                        break;
                    }
                    Err(Fail::At(e)) => match e {
                        AtError::Cms(n) => (SubmitErrorKind::Cms(n), None),
                        AtError::Cme(n) => (SubmitErrorKind::Cme(n), None),
                        AtError::Error => (SubmitErrorKind::Error, None),
                        AtError::InvalidCommand(_) => (SubmitErrorKind::InvalidPdu, None),
                        AtError::Timeout | AtError::LineTooLong => (
                            SubmitErrorKind::Timeout,
                            Some(Next::Reinit(format!("no answer to AT+CMGS: {e}"))),
                        ),
                        _ => (
                            SubmitErrorKind::Error,
                            Some(Next::Reinit(format!("dialogue: {e}"))),
                        ),
                    },
                    Err(Fail::Port(e)) => (
                        SubmitErrorKind::Disconnected,
                        Some(Next::Reopen(format!("port failed during a submit: {e}"))),
                    ),
                    Err(Fail::Stopped) => (SubmitErrorKind::Disconnected, Some(Next::Stopped)),
                };
                let class = kind.class();
                if class == ErrorClass::Busy && next.is_none() && attempt < busy.max_attempts {
                    attempt += 1;
                    let delay = busy.delay_before(attempt).min(self.poll_interval());
                    debug!(modem = %self.cfg.name, %kind, ?delay, attempt, "modem busy, retrying");
                    match self.pause(delay) {
                        Ok(()) => continue,
                        Err(Fail::Port(e)) => {
                            let err = SubmitError::new(SubmitErrorKind::Disconnected, i, false);
                            return (Err(err), Some(Next::Reopen(format!("port failed: {e}"))));
                        }
                        Err(_) => {
                            let err = SubmitError::new(SubmitErrorKind::Disconnected, i, false);
                            return (Err(err), Some(Next::Stopped));
                        }
                    }
                }
                let maybe_sent = self.pdu_written
                    && matches!(
                        kind,
                        SubmitErrorKind::Timeout | SubmitErrorKind::Disconnected
                    );
                let err = SubmitError::new(kind, i, maybe_sent);
                debug!(modem = %self.cfg.name, part = i + 1, parts = total, %kind, class = ?class, maybe_sent, "submit failed");
                let next = next.or_else(|| match class {
                    ErrorClass::ModemFault => Some(Next::Faulty(format!("{kind} while sending"))),
                    ErrorClass::NetworkPause => {
                        Some(Next::Reinit(format!("{kind}: re-registering")))
                    }
                    _ => None,
                });
                return (Err(err), next);
            }
        }
        debug!(modem = %self.cfg.name, parts = total, "submitted");
        (Ok(SubmitReceipt { message_refs: refs }), None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::modem::pdu::{encode_submit, SubmitOptions};
    use crate::phone::E164;
    use crate::sim::{Fault, SimModem, SimOptions};

    fn pdus(dest: &str, text: &str, max_parts: u8) -> Vec<(usize, String)> {
        let dest: E164 = dest.parse().unwrap();
        let opts = SubmitOptions {
            max_parts,
            concat_ref: 7,
            ..SubmitOptions::default()
        };
        encode_submit(&dest, text, &opts)
            .unwrap()
            .into_iter()
            .map(|p| (p.tpdu_len, p.hex))
            .collect()
    }

    fn cfg(name: &str, sim: &SimModem) -> ModemConfig {
        ModemConfig {
            command_timeout: Duration::from_millis(1000),
            submit_timeout: Duration::from_millis(2000),
            reopen_backoff_max: Duration::from_millis(100),
            ..ModemConfig::new(name, sim.device_path())
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    async fn ready(h: &ModemHandle) {
        let st = h.wait_for_state(WAIT, |s| *s == ModemState::Ready).await;
        assert!(st.is_ok(), "modem not ready: {:?}", st);
    }

    #[tokio::test]
    async fn init_and_submit_two_parts() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        let long = "Mail from alice@example.org: quarterly report and a very long subject line that does not fit one part at all. ".repeat(2);
        let parts = pdus("+8613800138000", &long, 3);
        assert_eq!(parts.len(), 2);
        let receipt = h.submit(parts.clone()).await.unwrap();
        assert_eq!(receipt.message_refs.len(), 2);
        let got = sim.received();
        assert_eq!(got.len(), 2);
        for ((len, hex), r) in parts.iter().zip(&got) {
            assert_eq!(r.tpdu_len, *len);
            assert_eq!(&r.hex, hex);
        }
        assert_eq!(
            receipt.message_refs,
            got.iter().map(|r| r.mr).collect::<Vec<_>>()
        );
        let st = h.status();
        assert_eq!(st.sent, 2);
        assert_eq!(st.signal, Some(21));
        // init switched echo off, errors to numeric, PDU mode
        let cmds = sim.commands();
        for c in ["ATE0", "AT+CMEE=1", "AT+CMGF=0", "AT+CPIN?", "AT+CREG?"] {
            assert!(cmds.iter().any(|x| x == c), "{c} not sent: {cmds:?}");
        }
        h.shutdown().await;
        assert_eq!(h.state(), ModemState::Stopped);
        let err = h.submit(parts).await.unwrap_err();
        assert_eq!(err.kind, SubmitErrorKind::Disconnected);
    }

    #[tokio::test]
    async fn error_answers_come_back_with_their_class() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        let p = pdus("+8613800138000", "hi", 1);

        sim.inject(Fault::CmsError(500));
        let e = h.submit(p.clone()).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Cms(500));
        assert_eq!(e.class, ErrorClass::Unknown);
        assert!(!e.maybe_sent);

        sim.inject(Fault::PlainError);
        let e = h.submit(p.clone()).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Error);
        assert_eq!(e.class, ErrorClass::Transient);

        sim.set_rejected_number("8613800138000");
        let e = h.submit(p.clone()).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Cms(21));
        assert_eq!(e.class, ErrorClass::Permanent);
        // another number still goes through, and the modem stayed ready
        assert_eq!(h.state(), ModemState::Ready);
        h.submit(pdus("+4915112345678", "hi", 1)).await.unwrap();
        assert_eq!(sim.received().len(), 1);
        assert_eq!(h.status().failed, 3);

        // a bad PDU is refused by the dialogue before anything is written
        let e = h.submit(vec![(5, "00zz".into())]).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::InvalidPdu);
        assert_eq!(e.class, ErrorClass::Bug);
        // a wrong length reaches the modem, which answers 304
        let (len, hex) = p[0].clone();
        let e = h.submit(vec![(len - 1, hex)]).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Cms(304));
        assert_eq!(e.class, ErrorClass::Bug);
    }

    #[tokio::test]
    async fn busy_is_retried_inside_the_driver() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        sim.inject(Fault::CmsError(515));
        sim.inject(Fault::CmsError(515));
        let r = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        assert_eq!(r.message_refs.len(), 1);
        assert_eq!(sim.received().len(), 1);
        let cmgs = sim
            .commands()
            .iter()
            .filter(|c| c.starts_with("AT+CMGS="))
            .count();
        assert_eq!(cmgs, 3, "two busy answers, then success");
        // a modem that stays busy gives up with the Busy class
        for _ in 0..10 {
            sim.inject(Fault::CmsError(515));
        }
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Busy);
        assert!(!e.maybe_sent);
    }

    #[tokio::test]
    async fn silence_times_out_then_the_modem_recovers() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        sim.inject(Fault::Silence);
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Timeout);
        assert!(!e.maybe_sent, "no prompt came, so no PDU was written");
        let st = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Reopening))
            .await;
        assert!(st.is_ok(), "re-init of a silent modem must fail: {st:?}");
        // while down, submits are refused at once
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert!(matches!(
            e.kind,
            SubmitErrorKind::Disconnected | SubmitErrorKind::NotReady
        ));
        sim.clear_faults();
        ready(&h).await;
        h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        assert_eq!(sim.received().len(), 1);
    }

    #[tokio::test]
    async fn late_answer_is_reported_as_maybe_sent() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        sim.inject(Fault::Delay(Duration::from_millis(3000)));
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Timeout);
        assert!(e.maybe_sent);
        assert_eq!(sim.received().len(), 1, "the SMSC did get it");
        sim.clear_faults();
        ready(&h).await;
        h.submit(pdus("+8613800138000", "again", 1)).await.unwrap();
    }

    #[tokio::test]
    async fn hangup_disconnects_and_a_new_device_at_the_same_path_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ttyMODEM");
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        std::os::unix::fs::symlink(sim.device_path(), &link).unwrap();
        let h = spawn(ModemConfig {
            device: link.clone(),
            ..cfg("m1", &sim)
        });
        ready(&h).await;
        sim.inject(Fault::Hangup);
        let down = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Reopening))
            .await;
        assert!(down.is_ok(), "{down:?}");
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Disconnected);
        assert!(h.status().last_error.is_some());
        // the device comes back (a replugged modem behind the same by-id link)
        let sim2 = SimModem::spawn(SimOptions::default()).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(sim2.device_path(), &link).unwrap();
        ready(&h).await;
        h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        assert_eq!(sim2.received().len(), 1);
        drop(sim);
    }

    #[tokio::test]
    async fn hangup_during_a_submit_fails_it_without_hanging() {
        let sim = SimModem::spawn(SimOptions {
            submit_delay: Duration::from_millis(300),
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(ModemConfig {
            submit_timeout: Duration::from_secs(5),
            ..cfg("m1", &sim)
        });
        ready(&h).await;
        let h2 = h.clone();
        let task = tokio::spawn(async move { h2.submit(pdus("+8613800138000", "hi", 1)).await });
        // wait until the sim holds the PDU, then pull the plug
        let deadline = Instant::now() + WAIT;
        while sim.received().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sim.inject(Fault::Hangup);
        let e = tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Disconnected);
        assert!(e.maybe_sent);
    }

    #[tokio::test]
    async fn urc_storm_during_submit() {
        let sim = SimModem::spawn(SimOptions {
            submit_delay: Duration::from_millis(50),
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        sim.inject(Fault::UrcStorm(2000));
        sim.inject(Fault::Urc("+CMT: ,24".into()));
        let mut sent = 0;
        for _ in 0..5 {
            let r = h.submit(pdus("+8613800138000", "storm", 1)).await.unwrap();
            sent += r.message_refs.len();
        }
        assert_eq!(sent, 5);
        assert_eq!(sim.received().len(), 5);
        assert_eq!(h.state(), ModemState::Ready);
    }

    #[tokio::test]
    async fn sim_pin_right_and_wrong() {
        let sim = SimModem::spawn(SimOptions {
            require_pin: Some("4321".into()),
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(ModemConfig {
            pin: Some("4321".into()),
            ..cfg("good", &sim)
        });
        ready(&h).await;
        h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        h.shutdown().await;

        let sim = SimModem::spawn(SimOptions {
            require_pin: Some("4321".into()),
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(ModemConfig {
            pin: Some("0000".into()),
            ..cfg("bad", &sim)
        });
        let st = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Faulty(_)))
            .await
            .unwrap();
        assert!(format!("{:?}", st.state).contains("PIN"));
        assert!(
            !format!("{st:?}").contains("0000"),
            "the PIN leaked: {st:?}"
        );
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::NotReady);
        // several re-init rounds later the wrong PIN was still tried only once
        let deadline = Instant::now() + WAIT;
        while sim.commands().iter().filter(|c| *c == "AT+CPIN?").count() < 3 {
            assert!(Instant::now() < deadline, "no re-init rounds");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let tries = sim
            .commands()
            .iter()
            .filter(|c| c.starts_with("AT+CPIN="))
            .count();
        assert_eq!(tries, 1);

        // no PIN configured at all
        let sim = SimModem::spawn(SimOptions {
            require_pin: Some("4321".into()),
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(cfg("none", &sim));
        let st = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Faulty(_)))
            .await;
        assert!(st.is_ok());
        assert!(sim.commands().iter().all(|c| !c.starts_with("AT+CPIN=")));
    }

    #[tokio::test]
    async fn unregistered_modem_is_faulty_until_it_registers() {
        let sim = SimModem::spawn(SimOptions {
            registered: false,
            ..SimOptions::default()
        })
        .unwrap();
        let h = spawn(cfg("m1", &sim));
        let st = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Faulty(_)))
            .await;
        assert!(st.is_ok(), "{st:?}");
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::NotReady);
        assert_eq!(e.class, ErrorClass::NetworkPause);
        sim.set_registered(true);
        ready(&h).await;
        h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
    }

    /// Submits `n` two-part messages: 2 × n submit-time samples.
    async fn submit_two_part(h: &ModemHandle, n: usize) {
        let long = "A notice long enough to need two parts of a concatenated SMS, so that each part is timed on its own by the driver. ".repeat(2);
        let parts = pdus("+8613800138000", &long, 3);
        assert_eq!(parts.len(), 2);
        for _ in 0..n {
            h.submit(parts.clone()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn derived_submit_timeout_fails_a_silent_modem_well_before_the_ceiling() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let ceiling = Duration::from_secs(30);
        let floor = Duration::from_secs(1);
        let h = spawn(ModemConfig {
            submit_timeout: ceiling,
            submit_timeout_floor: floor,
            ..cfg("m1", &sim)
        });
        ready(&h).await;
        assert_eq!(h.status().submit_timeout_ms, 30_000);
        // one sample short of the minimum: still the ceiling
        submit_two_part(&h, submit_time::MIN_SAMPLES / 2 - 1).await;
        h.submit(pdus("+8613800138000", "one more", 1))
            .await
            .unwrap();
        assert_eq!(h.status().submit_timeout_ms, 30_000);
        assert_eq!(h.status().submit_p99_ms, None);
        // the last sample: the sim answers in milliseconds, so p99 × 3 is under the floor
        h.submit(pdus("+8613800138000", "enough", 1)).await.unwrap();
        let st = h.status();
        assert_eq!(st.submit_timeout_ms, 1_000, "{st:?}");
        assert!(st.submit_p99_ms.is_some_and(|p| p < 1_000), "{st:?}");

        // the SMSC goes silent after the PDU is written
        sim.inject(Fault::Delay(Duration::from_secs(60)));
        let t = Instant::now();
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind, SubmitErrorKind::Timeout);
        assert!(e.maybe_sent);
        assert!(
            took >= floor,
            "gave up before the derived timeout: {took:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "took {took:?}: the derived 1 s timeout did not apply (ceiling {ceiling:?})"
        );
        // what the modem had shown no longer holds: the ceiling is back
        let st = h.status();
        assert_eq!(st.submit_timeout_ms, 30_000, "{st:?}");
        assert_eq!(st.submit_p99_ms, None);
        h.shutdown().await;
    }

    #[tokio::test]
    async fn without_history_the_configured_submit_timeout_applies() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let ceiling = Duration::from_millis(2500);
        let h = spawn(ModemConfig {
            submit_timeout: ceiling,
            submit_timeout_floor: Duration::from_millis(200),
            ..cfg("m1", &sim)
        });
        ready(&h).await;
        assert_eq!(h.status().submit_timeout_ms, 2_500);
        sim.inject(Fault::Delay(Duration::from_secs(60)));
        let t = Instant::now();
        let e = h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind, SubmitErrorKind::Timeout);
        assert!(e.maybe_sent);
        assert!(
            took >= ceiling,
            "gave up after {took:?}, before the ceiling"
        );
        assert!(took < WAIT, "took {took:?}");
        h.shutdown().await;
    }

    #[tokio::test]
    async fn an_idle_modem_wakes_for_a_urc() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        assert_eq!(h.status().signal, Some(21));
        let mut rx = h.subscribe();
        sim.inject(Fault::Urc("^RSSI:9".into()));
        // (`is_ok()` at once: the `Ref` that `wait_for` returns holds the watch's lock)
        let got = tokio::time::timeout(WAIT, rx.wait_for(|s| s.signal == Some(9)))
            .await
            .is_ok();
        assert!(got, "the URC was not handled: {:?}", h.status());
        assert_eq!(h.state(), ModemState::Ready);
        h.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        h.shutdown().await;
    }

    #[tokio::test]
    async fn dropping_every_handle_ends_an_idle_thread() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(cfg("m1", &sim));
        ready(&h).await;
        let mut rx = h.subscribe();
        let h2 = h.clone();
        drop(h);
        // one clone left: the thread keeps serving
        h2.submit(pdus("+8613800138000", "hi", 1)).await.unwrap();
        drop(h2);
        // the thread sleeps until the next probe (30 s) unless the last handle wakes it
        let ended = tokio::time::timeout(WAIT, rx.wait_for(|s| s.state == ModemState::Stopped))
            .await
            .is_ok();
        assert!(ended, "the thread did not end: {:?}", *rx.borrow());
    }

    #[tokio::test]
    async fn shutdown_during_a_long_submit_is_prompt() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(ModemConfig {
            submit_timeout: Duration::from_secs(60),
            ..cfg("m1", &sim)
        });
        ready(&h).await;
        sim.inject(Fault::Delay(Duration::from_secs(60)));
        let h2 = h.clone();
        let task = tokio::spawn(async move { h2.submit(pdus("+8613800138000", "hi", 1)).await });
        let deadline = Instant::now() + WAIT;
        while sim.received().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(sim.received().len(), 1, "the PDU never reached the sim");
        let stopped = tokio::time::timeout(WAIT, h.shutdown()).await;
        assert!(stopped.is_ok(), "shutdown waited for the submit deadline");
        let e = tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Disconnected);
        assert!(e.maybe_sent);
    }

    #[tokio::test]
    async fn missing_device_reopens_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let h = spawn(ModemConfig {
            reopen_backoff_max: Duration::from_millis(50),
            ..ModemConfig::new("ghost", dir.path().join("nope"))
        });
        let st = h
            .wait_for_state(WAIT, |s| matches!(s, ModemState::Reopening))
            .await;
        assert!(st.is_ok());
        let e = h.submit(vec![(1, "0000".into())]).await.unwrap_err();
        assert_eq!(e.kind, SubmitErrorKind::Disconnected);
        assert!(h.status().last_error.unwrap().contains("cannot open"));
        h.shutdown().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod throughput {
    use super::*;
    use crate::sim::{SimModem, SimOptions};

    /// Prints sequential submits per second through the sim (a benchmark, not asserted):
    /// `cargo test -p mailbell-gsm-agent --lib throughput -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "benchmark"]
    async fn sequential_submit_rate() {
        let sim = SimModem::spawn(SimOptions::default()).unwrap();
        let h = spawn(ModemConfig::new("bench", sim.device_path()));
        h.wait_for_state(Duration::from_secs(10), |s| *s == ModemState::Ready)
            .await
            .unwrap();
        let pdu = "0011000B916407281553F80000AA0AE8329BFD4697D9EC37".to_string();
        let n = 300;
        let t = Instant::now();
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(1)).await;
            h.submit(vec![(23, pdu.clone())]).await.unwrap();
        }
        let el = t.elapsed();
        eprintln!(
            "{n} submits in {el:?}: {:.0}/s",
            f64::from(n) / el.as_secs_f64()
        );
    }
}
