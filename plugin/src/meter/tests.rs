#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::ops::ControlFlow;

use super::*;

fn session(account: &str, n: u32) -> Entry {
    Entry::Session(Session {
        session: new_session_id(),
        account: Some(account.to_owned()),
        client: "192.0.2.1:50123".parse().unwrap(),
        protocol: Protocol::Pop3,
        listener: "pop3s".into(),
        tls: true,
        start_ms: 1_796_000_000_000,
        end_ms: 1_796_000_001_000,
        login: Login::Ok,
        bytes_to_client: 1000 + u64::from(n),
        bytes_to_backend: 50,
        messages: 1,
        message_bytes: 900,
        end: "backend closed the connection".into(),
        retrieved: vec![Message {
            msg: n,
            uidl: Some(format!("u{n}")),
            bytes: 900,
            complete: true,
            ..Message::default()
        }],
    })
}

fn cfg() -> MeterConfig {
    MeterConfig {
        flush_interval: Duration::from_millis(20),
        ..MeterConfig::default()
    }
}

fn all(store: &MeterStore) -> Vec<MeterRecord> {
    store
        .query(&MeterQuery {
            limit: MAX_QUERY_LIMIT,
            ..MeterQuery::default()
        })
        .unwrap()
        .records
}

fn ids(records: &[MeterRecord]) -> Vec<u64> {
    records.iter().map(|r| r.id).collect()
}

fn the_file(dir: &Path) -> PathBuf {
    let files = file::list(dir).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].1.clone()
}

#[test]
fn a_record_round_trips_through_its_frame_and_json() {
    let mut with_imap = session("Alice", 3);
    if let Entry::Session(s) = &mut with_imap {
        s.protocol = Protocol::Imap;
        s.retrieved.push(Message {
            msg: 4,
            mailbox: Some("INBOX".into()),
            uid: Some(77),
            section: Some("BODY[TEXT]<0>".into()),
            bytes: 12,
            complete: false,
            ..Message::default()
        });
    }
    let recs = [
        MeterRecord {
            id: 1,
            at_ms: 5,
            entry: with_imap,
        },
        MeterRecord {
            id: 2,
            at_ms: 6,
            entry: Entry::Messages(Messages {
                session: "ab".into(),
                account: None,
                retrieved: vec![Message::default()],
            }),
        },
    ];
    let mut buf = Vec::new();
    for r in &recs {
        file::encode(r, &mut buf).unwrap();
    }
    let mut back = Vec::new();
    let scanned = file::scan(&buf[..], u64::MAX, |r| {
        back.push(r);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(back, recs);
    assert_eq!(scanned.valid_len, buf.len() as u64);
    assert!(scanned.stopped.is_none());
    // The JSON form billing and jq read.
    let json = serde_json::to_value(&recs[0]).unwrap();
    assert_eq!(json["kind"], "session");
    assert_eq!(json["protocol"], "imap");
    assert_eq!(json["login"], "ok");
    assert_eq!(json["retrieved"][1]["section"], "BODY[TEXT]<0>");
}

/// A reader that hands out `n` bytes at a time.
struct Chunks<'a>(&'a [u8], usize);

impl Read for Chunks<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.1.min(out.len()).min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn records_read_the_same_in_any_chunking_and_a_cut_anywhere_ends_them_cleanly() {
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    for n in 1..=3 {
        let rec = MeterRecord {
            id: u64::from(n),
            at_ms: 1,
            entry: session("bob", n),
        };
        file::encode(&rec, &mut buf).unwrap();
        ends.push(buf.len());
    }
    let read = |r: &mut dyn Read, cap: u64| {
        let mut got = Vec::new();
        let s = file::scan(r, cap, |r| {
            got.push(r.id);
            ControlFlow::Continue(())
        })
        .unwrap();
        (got, s.valid_len, s.stopped.is_some())
    };
    for chunk in [1, 2, 7, 8, 9, 1000] {
        assert_eq!(
            read(&mut Chunks(&buf, chunk), u64::MAX),
            (vec![1, 2, 3], buf.len() as u64, false)
        );
    }
    // Cut at every byte: the whole records before the cut, and the cut is seen as torn unless
    // it falls on a boundary.
    for at in 0..=buf.len() {
        let whole = ends.iter().filter(|e| **e <= at).count();
        let valid = if whole == 0 { 0 } else { ends[whole - 1] };
        let (got, len, torn) = read(&mut &buf[..at], u64::MAX);
        assert_eq!(got, (1..=whole as u64).collect::<Vec<_>>(), "cut at {at}");
        assert_eq!(len, valid as u64);
        assert_eq!(torn, at != valid, "cut at {at}");
    }
    // A flipped byte inside the second record: the first one only.
    let mut bad = buf.clone();
    bad[ends[0] + 20] ^= 0x20;
    assert_eq!(
        read(&mut &bad[..], u64::MAX),
        (vec![1], ends[0] as u64, true)
    );
}

#[test]
fn ids_are_unique_and_increase_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store
        .append(vec![session("a", 1), session("b", 2)])
        .unwrap();
    store.append(vec![session("a", 3)]).unwrap();
    store.flush().unwrap();
    assert_eq!(ids(&all(&store)), [1, 2, 3]);
    // A second writer is refused while the first holds the lock.
    assert!(matches!(
        MeterStore::open(dir.path(), cfg()),
        Err(MeterError::Locked { .. })
    ));
    drop(store);
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.append(vec![session("c", 4)]).unwrap();
    store.flush().unwrap();
    let recs = all(&store);
    assert_eq!(ids(&recs), [1, 2, 3, 4]);
    assert_eq!(recs[3].entry.account(), Some("c"));
    // Paging by id: a consumer's cursor.
    let page = store
        .query(&MeterQuery {
            after: Some(1),
            limit: 2,
            ..MeterQuery::default()
        })
        .unwrap();
    assert_eq!(ids(&page.records), [2, 3]);
    assert_eq!(page.next_after, Some(3));
    let user = store
        .query(&MeterQuery {
            user: Some("A".into()),
            limit: 10,
            ..MeterQuery::default()
        })
        .unwrap();
    assert_eq!(ids(&user.records), [1, 3]);
    assert_eq!(user.next_after, None);
}

#[test]
fn a_torn_tail_is_cut_at_open_and_its_id_is_given_again_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store
        .append(vec![session("a", 1), session("a", 2)])
        .unwrap();
    store.flush().unwrap();
    drop(store);
    let path = the_file(dir.path());
    let good = std::fs::read(&path).unwrap();
    // What a crash in the middle of the third append leaves: part of a record.
    let mut third = Vec::new();
    file::encode(
        &MeterRecord {
            id: 3,
            at_ms: 1,
            entry: session("a", 3),
        },
        &mut third,
    )
    .unwrap();
    for cut in [1, file::HEADER, file::HEADER + 5, third.len() - 1] {
        let mut torn = good.clone();
        torn.extend_from_slice(&third[..cut]);
        std::fs::write(&path, &torn).unwrap();
        // A reader that does not own the store skips the tail without cutting it.
        assert_eq!(ids(&all(&MeterStore::open_read_only(dir.path()))), [1, 2]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), torn.len() as u64);
        let store = MeterStore::open(dir.path(), cfg()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good, "cut at {cut}");
        store.append(vec![session("z", 9)]).unwrap();
        store.flush().unwrap();
        assert_eq!(ids(&all(&store)), [1, 2, 3]);
        drop(store);
        std::fs::write(&path, &good).unwrap();
    }
}

#[test]
fn ids_continue_from_an_older_file_when_the_newest_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let old = file::day_of(now_ms() - 2 * 86_400_000);
    let mut buf = Vec::new();
    file::encode(
        &MeterRecord {
            id: 41,
            at_ms: 1,
            entry: session("a", 1),
        },
        &mut buf,
    )
    .unwrap();
    std::fs::write(dir.path().join(file::file_name(old)), &buf).unwrap();
    // A crash just after the day's file was created, before its first record.
    std::fs::write(
        dir.path().join(file::file_name(file::day_of(now_ms()))),
        b"\x05\x00",
    )
    .unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.append(vec![session("b", 2)]).unwrap();
    store.flush().unwrap();
    assert_eq!(ids(&all(&store)), [41, 42]);
}

#[test]
fn retention_deletes_whole_old_files_but_never_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let days_ago = |d: i64| file::day_of(now - d * 86_400_000);
    for d in [500, 402, 399, 3] {
        std::fs::write(dir.path().join(file::file_name(days_ago(d))), b"").unwrap();
    }
    let store = MeterStore::open_read_only(dir.path());
    assert_eq!(file::prune(dir.path(), 400, now).unwrap(), 2);
    let left: Vec<NaiveDateLike> = file::list(dir.path())
        .unwrap()
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(left, [days_ago(399), days_ago(3)]);
    // Only the newest file left, however old: kept (it holds the largest id).
    assert_eq!(
        file::prune(dir.path(), 1, now + 1000 * 86_400_000).unwrap(),
        1
    );
    assert_eq!(file::list(dir.path()).unwrap().len(), 1);
    assert_eq!(
        file::prune(dir.path(), 0, now + 1000 * 86_400_000).unwrap(),
        0
    );
    drop(store);
    // Open prunes too.
    std::fs::write(dir.path().join(file::file_name(days_ago(900))), b"").unwrap();
    let _store = MeterStore::open(dir.path(), cfg()).unwrap();
    assert_eq!(file::list(dir.path()).unwrap().len(), 1);
}

type NaiveDateLike = chrono::NaiveDate;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_disk_keeps_the_records_and_they_land_once_it_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.append_durable(vec![session("a", 1)]).await.unwrap();
    assert!(store.health().is_ok());
    store.inject_failure(Some(std::io::ErrorKind::StorageFull));
    let e = store
        .append_durable(vec![session("a", 2)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
    let cause = store.health().unwrap_err();
    assert!(
        cause.contains("meter-") && cause.contains("injected"),
        "{cause}"
    );
    store.append(vec![session("a", 3)]).unwrap();
    assert_eq!(store.stats().backlog.load(Ordering::Relaxed), 2);
    assert_eq!(ids(&all(&store)), [1], "nothing undurable is shown");
    store.inject_failure(None);
    store.append_durable(vec![session("a", 4)]).await.unwrap();
    assert!(store.health().is_ok());
    let recs = all(&store);
    assert_eq!(ids(&recs), [1, 2, 3, 4]);
    let ns: Vec<u32> = recs
        .iter()
        .map(|r| match &r.entry {
            Entry::Session(s) => s.retrieved[0].msg,
            Entry::Messages(_) => 0,
        })
        .collect();
    assert_eq!(ns, [1, 2, 3, 4]);
    let st = store.stats();
    assert_eq!(st.backlog.load(Ordering::Relaxed), 0);
    assert!(st.errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(st.records.load(Ordering::Relaxed), 4);
    drop(store);
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    assert_eq!(ids(&all(&store)), [1, 2, 3, 4]);
    let text = mailbell_link::metrics::encode_one(StatsRef(st));
    assert!(text.contains("mailbell_meter_records_total 4"), "{text}");
    assert!(
        text.contains("mailbell_meter_commit_seconds_count"),
        "{text}"
    );
}

#[derive(Debug)]
struct StatsRef(Arc<MeterStats>);

impl mailbell_link::metrics::Collector for StatsRef {
    fn encode(&self, enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        mailbell_link::metrics::Collector::encode(&*self.0, enc)
    }
}

#[test]
fn a_durable_append_is_on_disk_for_a_reader_that_opens_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(
        dir.path(),
        MeterConfig {
            flush_interval: Duration::from_secs(60),
            ..cfg()
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(store.append_durable(vec![session("a", 1)]))
        .unwrap();
    assert_eq!(ids(&all(&MeterStore::open_read_only(dir.path()))), [1]);
    // An interval append is not waited for: with a 60 s interval it is not on disk yet.
    store.append(vec![session("a", 2)]).unwrap();
    assert_eq!(ids(&all(&MeterStore::open_read_only(dir.path()))), [1]);
    store.flush().unwrap();
    assert_eq!(ids(&all(&MeterStore::open_read_only(dir.path()))), [1, 2]);
}

#[test]
fn text_and_csv_forms_carry_the_fields() {
    let r = MeterRecord {
        id: 12,
        at_ms: 1_796_000_001_000,
        entry: session("al ice", 3),
    };
    let line = format_session(&r);
    assert!(line.starts_with("2026-"), "{line}");
    assert!(
        line.contains("#12 session account=\"al ice\" pop3s client=192.0.2.1:50123 tls login=ok"),
        "{line}"
    );
    assert!(
        line.contains("messages=1/900 end=\"backend closed the connection\""),
        "{line}"
    );
    let rows = csv_rows(&r);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|row| row.len() == CSV_HEADER.len()));
    assert_eq!(rows[0][2], "session");
    assert_eq!(rows[0][12], "1003");
    assert_eq!(rows[1][2], "message");
    assert_eq!(rows[1][18], "u3");
    assert_eq!(rows[1][23], "900");
}

#[test]
fn past_the_backlog_cap_appends_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.inject_failure(Some(std::io::ErrorKind::Other));
    let batch: Vec<Entry> = (0..10_000).map(|n| session("a", n)).collect();
    for _ in 0..MAX_BACKLOG / 10_000 {
        store.append(batch.clone()).unwrap();
    }
    assert!(matches!(
        store.append(vec![session("a", 1)]),
        Err(MeterError::Backlog)
    ));
    let st = store.stats();
    assert_eq!(st.refused.load(Ordering::Relaxed), 1);
    assert_eq!(st.backlog.load(Ordering::Relaxed), MAX_BACKLOG);
    // Once the disk takes them, every waiting record lands and appends are taken again.
    store.inject_failure(None);
    store.flush().unwrap();
    assert_eq!(st.records.load(Ordering::Relaxed), MAX_BACKLOG);
    store.append(vec![session("a", 1)]).unwrap();
}

#[test]
fn records_go_to_the_file_of_their_day_and_midnight_starts_a_new_one() {
    use std::sync::atomic::AtomicI64;
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let t0 = 1_796_083_200_000 - 1_000; // 2026-11-30T23:59:59Z
    let now = Arc::new(AtomicI64::new(t0));
    let clock = now.clone();
    let cfg = MeterConfig {
        retention_days: 2,
        ..cfg()
    };
    let store = MeterStore::open_with_clock(
        dir.path(),
        cfg,
        Arc::new(move || clock.load(Ordering::Relaxed)),
    )
    .unwrap();
    store.append(vec![session("a", 1)]).unwrap();
    store.flush().unwrap();
    now.store(t0 + 2_000, Ordering::Relaxed);
    store.append(vec![session("a", 2)]).unwrap();
    store.flush().unwrap();
    let names: Vec<String> = file::list(dir.path())
        .unwrap()
        .iter()
        .map(|f| f.1.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["meter-2026-11-30.log", "meter-2026-12-01.log"]);
    let since = |ms| {
        store
            .query(&MeterQuery {
                since_ms: Some(ms),
                limit: 10,
                ..MeterQuery::default()
            })
            .unwrap()
            .records
    };
    assert_eq!(ids(&since(t0)), [1, 2]);
    assert_eq!(ids(&since(t0 + 1_000)), [2]);
    // Three days on, the next file's start prunes the first two days' files.
    now.store(t0 + 3 * day + 2_000, Ordering::Relaxed);
    store.append(vec![session("a", 3)]).unwrap();
    store.flush().unwrap();
    assert_eq!(ids(&all(&store)), [3]);
    assert_eq!(store.stats().pruned_files.load(Ordering::Relaxed), 2);
}

#[test]
fn a_file_that_cannot_be_created_names_its_path_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.inject_failure(Some(std::io::ErrorKind::PermissionDenied));
    store.append(vec![session("a", 1)]).unwrap();
    let e = store.flush().unwrap_err().to_string();
    assert!(
        e.contains(&dir.path().display().to_string())
            && e.contains("create a file: injected failure"),
        "{e}"
    );
    // Closing with the record still refused logs it whole (and does not hang).
    drop(store);
    assert!(file::list(dir.path()).unwrap().is_empty());
}

#[test]
fn scans_after_a_cursor_read_each_record_above_it_once_and_skip_older_files_unread() {
    use std::sync::atomic::AtomicI64;
    let dir = tempfile::tempdir().unwrap();
    let day = 86_400_000;
    let t0 = 1_796_083_200_000; // 2026-12-01T00:00:00Z
    let now = Arc::new(AtomicI64::new(t0));
    let clock = now.clone();
    let store = MeterStore::open_with_clock(
        dir.path(),
        cfg(),
        Arc::new(move || clock.load(Ordering::Relaxed)),
    )
    .unwrap();
    // Sessions 1-3 on the first day, 4-5 on the second, 6-8 and a messages record (9) on the
    // third.
    let mut n = 0;
    for (d, count) in [(0, 3), (1, 2), (2, 3)] {
        now.store(t0 + d * day + 1_000, Ordering::Relaxed);
        for _ in 0..count {
            n += 1;
            store.append(vec![session("a", n)]).unwrap();
        }
        store.flush().unwrap();
    }
    store
        .append(vec![Entry::Messages(Messages {
            session: new_session_id(),
            account: Some("a".into()),
            retrieved: vec![Message::default()],
        })])
        .unwrap();
    store.flush().unwrap();
    assert_eq!(file::list(dir.path()).unwrap().len(), 3);
    let scan = |after: u64| {
        // Every record each scan hands over, in order, never stopping it.
        let go = ControlFlow::Continue(());
        let mut got = Vec::new();
        let mut heads = Vec::new();
        let mut sessions = Vec::new();
        store
            .scan_after(after, &mut |r| go.map_continue(|()| got.push(r.id)))
            .unwrap();
        let ids = &mut |id, at_ms| go.map_continue(|()| heads.push((id, at_ms)));
        store.scan_ids_after(after, ids).unwrap();
        let summaries = &mut |id, x| go.map_continue(|()| sessions.push((id, x)));
        store.scan_sessions_after(after, summaries).unwrap();
        assert_eq!(got, heads.iter().map(|h| h.0).collect::<Vec<_>>());
        assert_eq!(got, sessions.iter().map(|h| h.0).collect::<Vec<_>>());
        for (id, x) in &sessions {
            let want = (*id <= 8).then(|| SessionSummary {
                account: Some("a".into()),
                client: "192.0.2.1:50123".parse().unwrap(),
                protocol: Protocol::Pop3,
                start_ms: 1_796_000_000_000,
                login: Login::Ok,
                messages: 1,
                message_bytes: 900,
            });
            assert_eq!(x, &want, "record {id}");
        }
        (got, heads)
    };
    for after in 0..=10 {
        let want: Vec<u64> = (after + 1..=9).collect();
        assert_eq!(scan(after).0, want, "after {after}");
    }
    assert_eq!(scan(5).1, [6, 7, 8, 9].map(|id| (id, t0 + 2 * day + 1_000)));
    // `f` stops the scan.
    let mut got = Vec::new();
    store
        .scan_after(2, &mut |r| {
            got.push(r.id);
            if r.id == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(got, [3, 4]);
    // A file wholly at or below the cursor is not opened: the first day's file replaced by a
    // directory fails a scan from the start, not one from id 3 on.
    let first = file::list(dir.path()).unwrap()[0].1.clone();
    std::fs::remove_file(&first).unwrap();
    std::fs::create_dir(&first).unwrap();
    assert_eq!(scan(3).0, [4, 5, 6, 7, 8, 9]);
    let e = store
        .scan_after(0, &mut |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("meter-2026-12-01.log"), "{e}");
}

/// Records are encoded by the appending threads with the id left open and the id written in
/// under the queue's lock: appenders on several threads at once still leave ids 1, 2, 3, …
/// in file order, every record reads back whole (CRC, JSON) with its own id.
#[test]
fn appenders_on_several_threads_leave_increasing_ids_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let store = store.clone();
            s.spawn(move || {
                for i in 0..250u32 {
                    let batch = (0..(i % 3 + 1))
                        .map(|k| session(&format!("u{t}"), i * 10 + k))
                        .collect();
                    store.append(batch).unwrap();
                }
            });
        }
    });
    store.flush().unwrap();
    let got = all(&store);
    let n = got.len() as u64;
    assert_eq!(n, 4 * (0..250u64).map(|i| i % 3 + 1).sum::<u64>());
    assert_eq!(ids(&got), (1..=n).collect::<Vec<_>>());
    // The ids are padded to the placeholder's width inside the JSON, and still read exactly.
    let raw = std::fs::read(the_file(dir.path())).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains(r#"{"id":1                   ,"at_ms":"#),
        "{}",
        &text[..200]
    );
    // A reopened store continues after them.
    drop(store);
    let store = MeterStore::open(dir.path(), cfg()).unwrap();
    store.append(vec![session("late", 1)]).unwrap();
    store.flush().unwrap();
    assert_eq!(all(&store).last().unwrap().id, n + 1);
}

/// A record encoded with its id left open and the id set under the queue's lock (the CRC
/// combined from the id's bytes and the rest's) reads back as the same record with that id,
/// for ids of every width.
#[test]
fn an_open_record_with_its_id_set_checks_out_and_reads_back() {
    let ids = [0, 7, 10, 12_345, 10_u64.pow(19), u64::MAX - 1];
    let entries: Vec<Entry> = (0..ids.len() as u32).map(|n| session("carol", n)).collect();
    let mut buf = Vec::new();
    let mut opens = Vec::new();
    for e in &entries {
        let open = file::encode_open(5, e.clone(), &mut buf)
            .map_err(|e| e.0)
            .unwrap();
        opens.push(open);
    }
    for (open, id) in opens.iter().zip(ids) {
        file::set_id(&mut buf, open, id);
    }
    let mut back = Vec::new();
    let scanned = file::scan(&buf[..], u64::MAX, |r| {
        back.push(r);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(scanned.stopped.is_none(), "{:?}", scanned.stopped);
    let got: Vec<(u64, i64)> = back.iter().map(|r| (r.id, r.at_ms)).collect();
    let want: Vec<(u64, i64)> = ids.iter().map(|&id| (id, 5)).collect();
    assert_eq!(got, want);
    for (r, e) in back.iter().zip(&entries) {
        assert_eq!(&r.entry, e);
    }
    // A flipped byte after the id still fails the CRC.
    let last = buf.len() - 2;
    buf[last] ^= 1;
    let scanned = file::scan(&buf[..], u64::MAX, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(scanned.stopped, Some("CRC mismatch"));
}

/// Appends without a waiter do not wake the writer each: they are committed together, as
/// one group, once the interval from the first of them is up.
#[test]
fn appends_without_a_waiter_land_in_one_commit_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeterStore::open(
        dir.path(),
        MeterConfig {
            flush_interval: Duration::from_millis(300),
            ..MeterConfig::default()
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    for n in 1..=50 {
        store.append(vec![session("a", n)]).unwrap();
    }
    let st = store.stats();
    let deadline = started + Duration::from_secs(10);
    while st.records.load(Ordering::Relaxed) < 50 {
        assert!(std::time::Instant::now() < deadline, "not durable in 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "committed before the interval was up: {:?}",
        started.elapsed()
    );
    assert_eq!(st.commits.load(Ordering::Relaxed), 1, "one group commit");
    assert_eq!(ids(&all(&store)), (1..=50).collect::<Vec<u64>>());
}
