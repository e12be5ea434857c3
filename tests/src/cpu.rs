//! CPU time from /proc, for the benchmarks' reports.

use std::collections::HashMap;

/// CPU ticks per (thread id, thread name) of this process.
pub fn thread_cpu() -> HashMap<(u32, String), u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        if let Some((name, ticks)) = parse_stat(&stat) {
            out.insert((tid, name), ticks);
        }
    }
    out
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
}
