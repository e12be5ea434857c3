//! Runs the accounting run where it lives (the daemon's schedule, the admin API, the local
//! CLI) and carries out what it decided outside the ledger: the user registry's state, which
//! the retrieval proxy enforces at once, and the arrears/warning SMS.
//!
//! Effects are recorded in the ledger by the run's last transaction and marked done only
//! after they happened, so a crash in between repeats an effect, never loses it. An SMS
//! effect waits until a notifier exists (the daemon); a local CLI run leaves it for the
//! daemon, which carries out open effects when it starts and every minute.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::ledger::sqlite::SqliteLedger;
use super::ledger::{Effect, EffectKind, LedgerError, LedgerStore, Status};
use super::run::{self, Period, Progress, RunContext, RunError, RunLock, RunSettings, RunSummary};
use crate::audit::{AuditEvent, AuditLog};
use crate::meter::MeterStore;
use crate::notify::intake::AccountResolver;
use crate::users::access::AccountState;
use crate::users::{UserPatch, UserStore};

/// Sends arrears and warning SMS; answers, per effect id, whether it is done (queued, or
/// impossible for good: no such user, no phone — recorded in the audit log either way).
pub type Notifier = Arc<
    dyn Fn(Vec<Effect>) -> Pin<Box<dyn Future<Output = Vec<(i64, bool)>> + Send>> + Send + Sync,
>;

/// The user registry the state effects go to.
#[derive(Clone)]
pub enum Registry {
    /// The daemon's open registry.
    Open(UserStore),
    /// A local command: opened only while effects are carried out (a run must not hold the
    /// registry's lock while it posts), and given up when another process holds it.
    Path {
        path: PathBuf,
        languages: Vec<String>,
    },
}

impl Registry {
    fn get(&self) -> Option<UserStore> {
        match self {
            Registry::Open(u) => Some(u.clone()),
            Registry::Path { path, languages } => {
                match UserStore::open_with(path, std::time::Duration::from_secs(2)) {
                    Ok(u) => Some(u.with_languages(languages)),
                    Err(e) => {
                        warn!(error = %e, "user registry not opened: billing state changes wait for the next run or the daemon");
                        None
                    }
                }
            }
        }
    }
}

/// Everything a run and its effects need.
#[derive(Clone)]
pub struct Accountant {
    pub ledger_path: PathBuf,
    pub meter: Option<MeterStore>,
    pub users: Registry,
    pub accounts: Option<AccountResolver>,
    pub settings: RunSettings,
    pub audit: Option<AuditLog>,
    pub notifier: Option<Notifier>,
    /// Stalwart's management API, when `billing.stalwart_permissions` is on: the second
    /// line of defence (read permissions withheld in arrears).
    pub stalwart: Option<Arc<crate::mta::stalwart_api::Permissions>>,
}

/// What carrying out effects did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectsReport {
    pub states: u64,
    pub notices: u64,
    /// SMS effects left for the daemon (no notifier here), or that failed and are retried.
    pub waiting: u64,
    /// State changes Stalwart's API refused or did not answer (retried every minute).
    #[serde(default)]
    pub stalwart_failed: u64,
}

/// A run's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReply {
    pub summary: RunSummary,
    pub effects: EffectsReport,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Accountant {
    /// An operator's status change (`billing account set --status`): the registry's state,
    /// which the retrieval proxy enforces, follows the ledger's. `Ok(false)`: the registry has
    /// no such user.
    pub fn set_registry_state(&self, login: &str, status: Status) -> Result<bool, String> {
        let users = self.users.get().ok_or_else(|| {
            "the user registry could not be opened (another mailbell process holds it?)".to_owned()
        })?;
        let state = match status {
            Status::Normal => AccountState::Normal,
            Status::Arrears => AccountState::Arrears,
            Status::Unwelcome => AccountState::Unwelcome,
        };
        match users.get(login) {
            Ok(None) => return Ok(false),
            Ok(Some(u)) if u.state == state => return Ok(true),
            Ok(Some(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        users
            .update(
                login,
                &UserPatch {
                    state: Some(state),
                    ..UserPatch::default()
                },
            )
            .map(|_| true)
            .map_err(|e| e.to_string())
    }

    /// Runs `period` (blocking: call from a blocking thread). One run at a time per ledger,
    /// across processes.
    pub fn run_blocking(
        &self,
        period: &Period,
        progress: &dyn Progress,
    ) -> Result<RunSummary, RunError> {
        let _lock = RunLock::acquire(&self.ledger_path, &period.name, now_ms())?;
        let mut store = SqliteLedger::open(&self.ledger_path)?;
        let resolve = |account: &str| -> Option<String> {
            let id: u64 = account.strip_prefix("stalwart:")?.parse().ok()?;
            let r = self.accounts.as_ref()?;
            r(id)?.first().map(|a| a.to_ascii_lowercase())
        };
        info!(period = %period.name, "accounting run starting");
        let s = run::run(
            &mut RunContext {
                store: &mut store,
                meter: self.meter.as_ref(),
                resolve: &resolve,
                settings: &self.settings,
                progress,
                now_ms: &now_ms,
            },
            period,
        )?;
        if s.already {
            info!(period = %s.period, "accounting run: period already accounted, nothing to do");
        } else {
            info!(
                period = %s.period, resumed = s.resumed, deliveries = s.deliveries,
                retrievals = s.retrievals, charges = s.charges, charged = %s.charged,
                pending = s.pending, pending_amount = %s.pending_amount, expired = s.expired,
                unbilled = s.unbilled, unpriced_bytes = s.unpriced_bytes,
                entries = s.new_entries, effects = s.effects, ms = s.millis,
                "accounting run finished"
            );
            if s.unbilled > 0 {
                warn!(period = %s.period, deliveries = s.unbilled, "deliveries to accounts the ledger does not know are kept unbilled: see `mailbell billing unbilled`");
            }
            if s.unpriced_bytes > 0 {
                warn!(period = %s.period, bytes = s.unpriced_bytes, "traffic with no tariff for its class and zone was not charged: see `mailbell billing tariff list`");
            }
        }
        Ok(s)
    }

    /// Runs `period` on a blocking thread, then carries out its effects.
    pub async fn run(
        &self,
        period: Period,
        progress: Arc<dyn Progress + Send + Sync>,
    ) -> Result<RunReply, RunError> {
        let me = self.clone();
        let summary =
            tokio::task::spawn_blocking(move || me.run_blocking(&period, progress.as_ref()))
                .await
                .map_err(|_| RunError::Ledger(LedgerError::Stopped))??;
        let effects = self.apply_effects().await?;
        Ok(RunReply { summary, effects })
    }

    /// Carries out the open effects: registry states, then SMS (when there is a notifier).
    pub async fn apply_effects(&self) -> Result<EffectsReport, LedgerError> {
        let path = self.ledger_path.clone();
        let open = tokio::task::spawn_blocking(move || {
            SqliteLedger::open_read_only(&path).and_then(|s| s.open_effects(10_000))
        })
        .await
        .map_err(|_| LedgerError::Stopped)??;
        let mut report = EffectsReport::default();
        let mut done = Vec::new();
        let mut sms = Vec::new();
        let users = if open.iter().any(|e| e.kind == EffectKind::State) {
            self.users.get()
        } else {
            None
        };
        for e in open {
            match e.kind {
                EffectKind::State => {
                    let registry = apply_state(users.as_ref(), self.audit.as_ref(), &e);
                    let stalwart = self.apply_stalwart(&e).await;
                    if !stalwart {
                        report.stalwart_failed += 1;
                    }
                    if registry && stalwart {
                        report.states += 1;
                        done.push(e.id);
                    }
                }
                EffectKind::Arrears | EffectKind::Warning => sms.push(e),
            }
        }
        match &self.notifier {
            Some(n) if !sms.is_empty() => {
                for (id, ok) in n(sms).await {
                    if ok {
                        report.notices += 1;
                        done.push(id);
                    } else {
                        report.waiting += 1;
                    }
                }
            }
            _ => report.waiting += sms.len() as u64,
        }
        if !done.is_empty() {
            let path = self.ledger_path.clone();
            tokio::task::spawn_blocking(move || {
                SqliteLedger::open(&path).and_then(|mut s| s.effects_done(&done, now_ms()))
            })
            .await
            .map_err(|_| LedgerError::Stopped)??;
        }
        Ok(report)
    }

    /// Withholds or gives back Stalwart's read permissions; `false` when it must be tried
    /// again (logged; the run is never held up by it).
    async fn apply_stalwart(&self, e: &Effect) -> bool {
        let Some(api) = &self.stalwart else {
            return true;
        };
        let arrears = match e.status {
            Status::Arrears => true,
            Status::Normal => false,
            Status::Unwelcome => return true,
        };
        match api.set_arrears(&e.login, arrears).await {
            Ok(n) => {
                if n > 0 {
                    info!(user = %e.login, arrears, changed = n, "Stalwart read permissions updated");
                }
                true
            }
            Err(err) => {
                warn!(user = %e.login, arrears, error = %err, "Stalwart permissions not updated; retried in a minute");
                false
            }
        }
    }
}

/// Sets the registry's state; `false` when it must be tried again.
fn apply_state(users: Option<&UserStore>, audit: Option<&AuditLog>, e: &Effect) -> bool {
    let Some(users) = users else {
        return false;
    };
    let want = match e.status {
        Status::Normal => AccountState::Normal,
        Status::Arrears => AccountState::Arrears,
        Status::Unwelcome => return true,
    };
    let current = match users.get(&e.login) {
        Ok(Some(u)) => u.state,
        Ok(None) => {
            warn!(user = %e.login, status = %e.status, "billing standing changed for an address the user registry does not have: nothing to enforce");
            return true;
        }
        Err(err) => {
            warn!(user = %e.login, error = %err, "cannot read the user registry; the state change is retried");
            return false;
        }
    };
    if current == AccountState::Unwelcome || current == want {
        // Unwelcome is the operator's; an equal state is already enforced.
        return true;
    }
    let patch = UserPatch {
        state: Some(want),
        ..UserPatch::default()
    };
    match users.update(&e.login, &patch) {
        Ok(_) => {
            info!(user = %e.login, state = want.as_str(), balance = %e.balance, "billing standing enforced by the retrieval proxy");
            if let Some(a) = audit {
                a.record(AuditEvent::Admin {
                    actor: "billing".into(),
                    action: format!("state {} (available balance {})", want.as_str(), e.balance),
                    target: e.login.clone(),
                });
            }
            true
        }
        Err(err) => {
            warn!(user = %e.login, error = %err, "cannot set the registry state; retried");
            false
        }
    }
}

/// The next local time `hh:mm` after `now_ms` (Unix ms).
fn next_local(now_ms: i64, (h, m): (u32, u32)) -> Option<i64> {
    use chrono::{Local, TimeZone};
    let now = Local.timestamp_millis_opt(now_ms).earliest()?;
    let mut day = now.date_naive();
    for _ in 0..3 {
        if let Some(t) = day
            .and_hms_opt(h, m, 0)
            .and_then(|t| Local.from_local_datetime(&t).earliest())
        {
            if t.timestamp_millis() > now_ms {
                return Some(t.timestamp_millis());
            }
        }
        day = day.succ_opt()?;
    }
    None
}

impl Accountant {
    /// The daemon's billing task: carries out open effects every minute and runs the
    /// accounting of the day before at `at` (local time). A run missed while the daemon was
    /// down is made up at start.
    pub async fn schedule(
        self,
        at: Option<(u32, u32)>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if let Some(at) = at {
            // Made up at start: yesterday's run when its time has passed today.
            let now = now_ms();
            let today_at = next_local(now - 86_400_000, at).unwrap_or(i64::MAX);
            if today_at <= now {
                self.scheduled_run().await;
            }
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = at.and_then(|at| next_local(now_ms(), at));
            let sleep_ms = next.map_or(u64::MAX / 4, |t| u64::try_from(t - now_ms()).unwrap_or(0));
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.apply_effects().await {
                        warn!(error = %e, "billing effects not carried out; retried in a minute");
                    }
                }
                () = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)) => {
                    self.scheduled_run().await;
                }
            }
        }
    }

    async fn scheduled_run(&self) {
        let period = match Period::parse_or_yesterday(None, now_ms()) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "scheduled accounting run: no period");
                return;
            }
        };
        let progress: Arc<dyn Progress + Send + Sync> = Arc::new(run::LogProgress::default());
        match self.run(period.clone(), progress).await {
            Ok(r) if !r.summary.already => info!(
                period = %period.name, states = r.effects.states, notices = r.effects.notices,
                waiting = r.effects.waiting, "scheduled accounting run done"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(period = %period.name, error = %e, "scheduled accounting run failed; the next run of the period resumes it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_local_time_is_today_or_tomorrow() {
        use chrono::{Local, TimeZone};
        let base = Local
            .with_ymd_and_hms(2026, 11, 3, 10, 0, 0)
            .earliest()
            .unwrap()
            .timestamp_millis();
        let t = next_local(base, (2, 30)).unwrap();
        let got = Local.timestamp_millis_opt(t).earliest().unwrap();
        assert_eq!(got.format("%Y-%m-%d %H:%M").to_string(), "2026-11-04 02:30");
        let t = next_local(base, (23, 5)).unwrap();
        let got = Local.timestamp_millis_opt(t).earliest().unwrap();
        assert_eq!(got.format("%Y-%m-%d %H:%M").to_string(), "2026-11-03 23:05");
    }
}
