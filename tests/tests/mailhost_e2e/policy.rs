//! The blocklist and the delivery meter with a real Postfix: a blocklisted sender domain gets
//! mailbell's 550 text through Postfix, a message from a free-zone address and one from
//! elsewhere are metered into their zones under Postfix's queue ids.

use std::os::unix::fs::PermissionsExt;

use mailbell::billing::ledger::sqlite::SqliteLedger;
use mailbell::billing::ledger::LedgerStore;
use mailbell::policy::zones::Zone;
use mailbell_tests::postfix::Postfix;

use crate::support::*;

#[test]
fn postfix_blocklisted_sender_gets_550_and_deliveries_are_metered_by_zone() {
    if !require(&["postfix", "swaks", "script", "chown"], true) {
        return;
    }
    bins();
    let scratch = Scratch::new("postfix-policy");
    let dir = scratch.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (senders, free) = (dir.join("senders.txt"), dir.join("free.txt"));
    std::fs::write(&senders, "junk.example\n").unwrap();
    // The free zone: loopback 127.0.0.2 only, so swaks from 127.0.0.1 is foreign.
    std::fs::write(&free, "127.0.0.2/32\n").unwrap();
    let pki = dir.join("pki");
    let agent = Agent::start(dir, free_addr(), &pki);
    let mail = Mailbell::start_with(
        dir,
        agent.link,
        &pki,
        &format!(
            "[billing]\nmeter_deliveries = true\n[zones]\nfree_networks = [{free:?}]\n\
             [blocklist]\nsender_domains = [{senders:?}]\nreply = \"junk.example is blocked here\"\n"
        ),
    );
    let pf =
        Postfix::start(&dir.join("postfix"), Some(&mail.milter_spec())).expect("start postfix");

    let r = pf
        .swaks(&[
            "--from",
            "spam@mx.junk.example",
            "--to",
            "alice@dest.example",
        ])
        .expect("swaks");
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!r.status.success(), "blocklisted sender accepted: {t}");
    assert!(
        t.contains("<** 550 5.7.1 junk.example is blocked here"),
        "{t}\n{}",
        pf.log()
    );

    let foreign = pf
        .swaks(&["--from", "a@remote.example", "--to", "alice@dest.example"])
        .expect("swaks");
    assert!(
        foreign.status.success(),
        "{}",
        String::from_utf8_lossy(&foreign.stdout)
    );
    let free_zone = pf
        .swaks(&[
            "--local-interface",
            "127.0.0.2",
            "--from",
            "b@uni.example",
            "--to",
            "alice@dest.example,bob@dest.example",
        ])
        .expect("swaks");
    assert!(
        free_zone.status.success(),
        "{}",
        String::from_utf8_lossy(&free_zone.stdout)
    );
    wait_for("three deliveries", 60, || pf.delivered() == 3);

    let ledger =
        SqliteLedger::open_read_only(&dir.join("mail-data/billing/ledger.sqlite")).unwrap();
    let rows = ledger.unconsumed_deliveries(100).unwrap();
    let got: Vec<_> = rows.iter().map(|d| (d.account.as_str(), d.zone)).collect();
    assert_eq!(
        got,
        [
            ("alice@dest.example", Zone::Foreign),
            ("alice@dest.example", Zone::Free),
            ("bob@dest.example", Zone::Free),
        ],
        "{rows:?}"
    );
    // Keyed by Postfix's queue ids ({i}), one per message.
    assert!(rows
        .iter()
        .all(|d| d.message_key.starts_with("milter:") && d.message_key.len() > 8));
    assert_ne!(rows[0].message_key, rows[1].message_key);
    assert_eq!(rows[1].message_key, rows[2].message_key);
    assert!(rows.iter().all(|d| d.bytes > 100), "{rows:?}");
    drop(pf);
    drop(mail);
}
