//! CPU time from /proc, for the benchmarks' reports.

use std::collections::HashMap;

/// Calls `f(thread id, /proc/self/task/<tid>)` for every thread of this process.
fn each_thread(mut f: impl FnMut(u32, &std::path::Path)) {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for e in dir.flatten() {
        if let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() {
            f(tid, &e.path());
        }
    }
}

/// CPU ticks per (thread id, thread name) of this process.
pub fn thread_cpu() -> HashMap<(u32, String), u64> {
    let mut out = HashMap::new();
    each_thread(|tid, dir| {
        if let Some((name, ticks)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            out.insert((tid, name), ticks);
        }
    });
    out
}

/// What the scheduler saw of one thread (/proc/self/task/<tid>/schedstat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sched {
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable but waiting for a CPU.
    pub wait_ns: u64,
    /// Time slices run: about one per wake-up.
    pub slices: u64,
}

/// [`Sched`] per (thread id, thread name) of this process.
pub fn thread_sched() -> HashMap<(u32, String), Sched> {
    let mut out = HashMap::new();
    each_thread(|tid, dir| {
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(s) = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| parse_schedstat(&s))
        {
            out.insert((tid, name.trim_end().to_owned()), s);
        }
    });
    out
}

/// Per thread name, what the threads of that name did between two [`thread_sched`] snapshots
/// (a thread that started in between counts from zero), busiest first.
pub fn sched_delta(
    before: &HashMap<(u32, String), Sched>,
    after: &HashMap<(u32, String), Sched>,
) -> Vec<(String, Sched)> {
    let mut by_name: HashMap<&str, Sched> = HashMap::new();
    for (key, a) in after {
        let b = before.get(key).copied().unwrap_or_default();
        let e = by_name.entry(key.1.as_str()).or_default();
        e.run_ns += a.run_ns.saturating_sub(b.run_ns);
        e.wait_ns += a.wait_ns.saturating_sub(b.wait_ns);
        e.slices += a.slices.saturating_sub(b.slices);
    }
    let mut v: Vec<(String, Sched)> = by_name
        .into_iter()
        .map(|(n, s)| (n.to_owned(), s))
        .collect();
    v.sort_by(|x, y| y.1.run_ns.cmp(&x.1.run_ns).then_with(|| x.0.cmp(&y.0)));
    v
}

/// A schedstat line: `run_ns wait_ns slices`.
pub fn parse_schedstat(line: &str) -> Option<Sched> {
    let mut f = line.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some(Sched {
        run_ns: f.next()??,
        wait_ns: f.next()??,
        slices: f.next()??,
    })
}

/// CPU ticks of the whole process.
pub fn process_cpu() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
        .map_or(0, |(_, t)| t)
}

/// The 1-, 5- and 15-minute load averages: other work on the machine skews the figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// (comm, utime + stime) from a /proc stat line.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let u: u64 = f.get(11)?.parse().ok()?;
    let s: u64 = f.get(12)?.parse().ok()?;
    Some((name, u + s))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "42 (tokio rt) S 1 1 1 0 -1 4194304 10 0 0 0 7 3 0 0 20 0 1 0 100 0 0";
        assert_eq!(super::parse_stat(line), Some(("tokio rt".into(), 10)));
        assert_eq!(super::parse_stat("garbage"), None);
    }

    #[test]
    fn schedstat_and_deltas_per_thread_name() {
        use super::{parse_schedstat, sched_delta, Sched};
        let s = |run_ns, wait_ns, slices| Sched {
            run_ns,
            wait_ns,
            slices,
        };
        assert_eq!(parse_schedstat("300 20 7\n"), Some(s(300, 20, 7)));
        assert_eq!(parse_schedstat("300 20"), None);
        let before = [
            ((1, "w".to_owned()), s(100, 10, 1)),
            ((2, "w".to_owned()), s(50, 0, 1)),
        ];
        let after = [
            ((1, "w".to_owned()), s(400, 20, 5)),
            ((2, "w".to_owned()), s(150, 5, 3)),
            // Started in between: counted from zero.
            ((3, "m".to_owned()), s(1000, 1, 9)),
        ];
        let d = sched_delta(&before.into_iter().collect(), &after.into_iter().collect());
        assert_eq!(
            d,
            vec![
                ("m".to_owned(), s(1000, 1, 9)),
                ("w".to_owned(), s(400, 15, 6))
            ]
        );
    }
}
