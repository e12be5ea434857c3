//! What the billing benches share (included with `#[path]`; not a bench of its own).

use mailbell::billing::ledger::{Status, UserAccount};

/// The login of the `i`-th benchmark account.
pub fn login(i: usize) -> String {
    format!("user{i:06}@mail.example.edu.cn")
}

/// `n` accounts; every tenth one staff, the rest students.
pub fn users(n: usize) -> Vec<UserAccount> {
    (0..n)
        .map(|i| UserAccount {
            login: login(i),
            staff_no: format!("2026{i:06}"),
            real_name: "张三".into(),
            class: if i % 10 == 0 { "staff" } else { "student" }.into(),
            status: Status::Normal,
            note: String::new(),
        })
        .collect()
}

/// This process's peak resident set (`VmHWM`), KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
