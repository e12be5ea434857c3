//! Interop with a real MTA: a private Postfix instance (test-peers.md §2.1, /etc/postfix
//! untouched) with mailbell as its milter, fed by swaks. The notice reaches the simulated modem
//! as a PDU whose decoded text carries the decoded RFC 2047 subject and display name; an
//! unregistered recipient gets no SMS; with mailbell down Postfix answers 451, so the mail is
//! never accepted without its notice.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use base64::Engine;
use mailbell_tests::postfix::Postfix;

use crate::support::*;

const PHONE: &str = "+8613800138000";

/// An RFC 2047 encoded-word (UTF-8, base64).
fn b_word(text: &str) -> String {
    format!(
        "=?UTF-8?B?{}?=",
        base64::engine::general_purpose::STANDARD.encode(text)
    )
}

fn transcript(o: &Output) -> String {
    format!(
        "exit {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// swaks for one message from 张三 <zhang@remote.example>.
fn send(pf: &Postfix, to: &str, subject: &str) -> Output {
    let from_header = format!("From: {} <zhang@remote.example>", b_word("张三"));
    let subject_header = format!("Subject: {}", b_word(subject));
    pf.swaks(&[
        "--from",
        "zhang@remote.example",
        "--to",
        to,
        "--header",
        &from_header,
        "--header",
        &subject_header,
        "--body",
        "正文 body line\n",
    ])
    .expect("run swaks")
}

#[test]
fn postfix_and_swaks_chinese_notice_unregistered_recipient_and_tempfail() {
    if !require(&["postfix", "sendmail", "swaks", "script", "chown"], true) {
        return;
    }
    bins();
    let started = Instant::now();
    let scratch = Scratch::new("postfix");
    let dir = scratch.path();
    // Postfix daemons run as postfix/nobody and must reach their directories below this one.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = dir.join("pki");
    let agent = Agent::start(dir, free_addr(), &pki);
    let mut mail = Mailbell::start(dir, agent.link, &pki, "rate_limit_secs = 0");

    // Register through the admin CLI (it finds the running daemon's admin API).
    let added = mail.cli_ok(&[
        "user",
        "add",
        "alice@dest.example",
        "--phone",
        PHONE,
        "--language",
        "zh",
    ]);
    assert!(added.contains("alice@dest.example"), "{added}");
    let shown = mail.cli_ok(&["user", "show", "alice@dest.example"]);
    assert!(
        shown.contains(PHONE) && shown.contains("language       zh"),
        "{shown}"
    );

    let pf =
        Postfix::start(&dir.join("postfix"), Some(&mail.milter_spec())).expect("start postfix");
    let mut seen = 0;

    // 1. A Chinese subject and display name, RFC 2047 encoded, reach the phone decoded.
    let subject = "测试邮件：季度报表";
    let r = send(&pf, "alice@dest.example", subject);
    assert!(r.status.success(), "swaks: {}", transcript(&r));
    let text = next_sms(&agent, &mut seen);
    assert!(text.contains(subject), "subject not in SMS text {text:?}");
    assert!(
        text.contains("张三"),
        "display name not in SMS text {text:?}"
    );
    // Alice has one address: the SMS leaves it out and keeps room for the subject (issue 9).
    assert!(
        !text.contains("alice"),
        "recipient of a one-address user in SMS text {text:?}"
    );

    // 1b. What Chinese mail clients send: a GB2312 display name, and a subject folded over two
    // lines as two encoded-words (Q then B) that decode to one run of text (RFC 2047 §6.2).
    let data = dir.join("gb2312.eml");
    std::fs::write(
        &data,
        format!(
            "From: =?gb2312?B?{name}?= <li@remote.example>\r\n\
             To: alice@dest.example\r\n\
             Subject: =?UTF-8?Q?{q}?=\r\n =?UTF-8?B?{b}?=\r\n\
             Date: Sun, 22 Nov 2026 10:00:00 +0800\r\n\
             Message-ID: <gb2312-1@remote.example>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=gb2312\r\n\
             \r\n\
             body\r\n",
            // 李四 in GB2312
            name = base64::engine::general_purpose::STANDARD.encode([0xC0, 0xEE, 0xCB, 0xC4]),
            q = q_encode("会议"),
            b = base64::engine::general_purpose::STANDARD.encode("改期通知"),
        ),
    )
    .unwrap();
    let r = pf
        .swaks(&[
            "--from",
            "li@remote.example",
            "--to",
            "alice@dest.example",
            "--data",
            data.to_str().unwrap(),
        ])
        .expect("run swaks");
    assert!(r.status.success(), "swaks: {}", transcript(&r));
    let text = next_sms(&agent, &mut seen);
    assert!(
        text.contains("会议改期通知"),
        "subject not in SMS text {text:?}"
    );
    assert!(
        text.contains("李四"),
        "GB2312 display name not in SMS text {text:?}"
    );

    // 1c. Mail submitted locally (sendmail -> pickup -> cleanup) passes non_smtpd_milters.
    let mut sm = Command::new("sendmail")
        .arg("-C")
        .arg(pf.dir.join("etc"))
        .args(["-f", "local@mta.test.invalid", "alice@dest.example"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run Postfix's sendmail");
    {
        use std::io::Write as _;
        let mut stdin = sm.stdin.take().unwrap();
        write!(stdin, "Subject: {}\n\nlocal\n", b_word("本地投递")).unwrap();
    }
    assert!(sm.wait().unwrap().success(), "sendmail -C failed");
    let text = next_sms(&agent, &mut seen);
    assert!(
        text.contains("本地投递"),
        "subject not in SMS text {text:?}"
    );

    // 2. An unregistered recipient: Postfix delivers the mail, nobody gets an SMS. A later
    // message to alice is the barrier: once its PDU is there, bob's would have been too.
    let r = send(&pf, "bob@dest.example", "给鲍勃的信");
    assert!(r.status.success(), "swaks: {}", transcript(&r));
    let r = send(&pf, "alice@dest.example", "第二封");
    assert!(r.status.success(), "swaks: {}", transcript(&r));
    let text = next_sms(&agent, &mut seen);
    assert!(text.contains("第二封"), "{text:?}");
    wait_for("five messages in the mailbox", 60, || pf.delivered() == 5);
    // The audit log (through the CLI) names alice's notices and nothing for bob.
    let mut alice_log = String::new();
    wait_for("alice's audit records", 30, || {
        alice_log = mail.cli_ok(&["log", "--user", "alice@dest.example"]);
        alice_log.contains("第二封")
    });
    assert!(alice_log.contains(subject), "{alice_log}");
    let bob_log = mail.cli_ok(&["log", "--user", "bob@dest.example"]);
    assert!(bob_log.trim().is_empty(), "{bob_log}");

    // 3. mailbell stopped: Postfix answers 451 (milter_default_action = tempfail) and keeps
    // nothing, so the sender retries; the mail is never taken without its notice.
    mail.daemon.stop();
    let r = send(&pf, "alice@dest.example", "重试");
    let t = transcript(&r);
    assert!(!r.status.success(), "accepted with mailbell down: {t}");
    assert!(
        t.contains("<** 451"),
        "no 451 from Postfix: {t}\n{}",
        pf.log()
    );
    let code = r.status.code();
    assert!(
        matches!(code, Some(23..=26)),
        "swaks exit {code:?} is not an SMTP rejection: {t}"
    );
    assert_eq!(
        pf.delivered(),
        5,
        "a message went in while mailbell was down"
    );

    // The sender's retry, once mailbell is back, goes through with its notice.
    mail.daemon.restart();
    let r = send(&pf, "alice@dest.example", "重试");
    assert!(r.status.success(), "swaks: {}", transcript(&r));
    let text = next_sms(&agent, &mut seen);
    assert!(text.contains("重试"), "{text:?}");
    wait_for("six messages in the mailbox", 60, || pf.delivered() == 6);
    drop(pf);
    // Nothing more arrived (bob's notice, a duplicate).
    assert_eq!(agent.pdus().len(), seen);
    eprintln!(
        "postfix interop: {:.1} s (swaks exit {code:?} with mailbell down)",
        started.elapsed().as_secs_f64()
    );
}

/// Sends alice a message with `subject`; Postfix must accept it and her next SMS carry it.
fn notified(pf: &Postfix, agent: &Agent, seen: &mut usize, subject: &str) {
    let r = send(pf, "alice@dest.example", subject);
    assert!(
        r.status.success(),
        "swaks: {}\n{}",
        transcript(&r),
        pf.log()
    );
    let text = next_sms(agent, seen);
    assert!(text.contains(subject), "{text:?}");
}

/// Waits for the next PDU; checks it went to alice's phone as plain decoded text, and that
/// it came alone. Returns its text.
fn next_sms(agent: &Agent, seen: &mut usize) -> String {
    let want = *seen + 1;
    wait_for(&format!("PDU #{want}"), 60, || agent.pdus().len() >= want);
    let pdus = agent.pdus();
    assert_eq!(pdus.len(), want, "unexpected extra PDUs: {pdus:?}");
    *seen = want;
    let sms = &pdus[want - 1];
    assert_eq!(sms.destination, PHONE, "{sms:?}");
    assert!(
        !sms.text.contains("=?"),
        "SMS text carries an undecoded encoded-word: {:?}",
        sms.text
    );
    sms.text.clone()
}

/// RFC 2047 Q encoding of UTF-8 text (every byte but letters and digits as =XX).
fn q_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("={b:02X}")
            }
        })
        .collect()
}

/// Postfix reaches the milter over a Unix-domain socket (`listen.milter = "unix:…"`, the usual
/// set-up for a milter on the MTA's host), named by a path relative to Postfix's queue
/// directory as the docs advise: the socket belongs to the group `postfix` with mode
/// 0660, a message gets its notice, a socket left behind by a killed daemon is replaced at the
/// next start, and a stopped daemon removes its socket, so Postfix tempfails.
#[test]
fn postfix_reaches_the_milter_over_a_unix_socket() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !require(&["postfix", "swaks", "script", "chown"], true) {
        return;
    }
    bins();
    let scratch = Scratch::new("postfix-unix");
    let dir = scratch.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = dir.join("pki");
    let agent = Agent::start(dir, free_addr(), &pki);
    // In Postfix's queue directory, named relative to it in smtpd_milters, as
    // docs/operations.md §14 has it for a chrooted Postfix.
    let socket = dir.join("postfix/spool/mailbell/milter.sock");
    std::fs::create_dir_all(socket.parent().unwrap()).expect("socket directory");
    let mut mail = Mailbell::configure_at(dir, agent.link, &pki, "", "", Some(&socket));
    mail.daemon.start();
    mail.cli_ok(&["user", "add", "alice@dest.example", "--phone", PHONE]);

    let meta = std::fs::symlink_metadata(&socket).expect("the milter socket exists");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    let postfix_gid = nix::unistd::Group::from_name("postfix")
        .expect("look up group postfix")
        .expect("group postfix exists")
        .gid
        .as_raw();
    assert_eq!(meta.gid(), postfix_gid, "the socket's group is not postfix");

    let pf = Postfix::start(&dir.join("postfix"), Some("unix:mailbell/milter.sock"))
        .expect("start postfix");
    let mut seen = 0;
    notified(&pf, &agent, &mut seen, "经由套接字");
    // The milter's counters are in /metrics as with TCP.
    let metrics = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(mailbell_link::http::request(
            mail.admin,
            "GET",
            "/metrics",
            None,
            None,
            std::time::Duration::from_secs(30),
        ))
        .expect("mailbell /metrics")
        .body;
    assert!(
        metrics.contains("mailbell_milter_messages_total 1\n"),
        "{metrics}"
    );

    // Killed: the socket file stays behind; the next start replaces it and serves again.
    mail.daemon.kill9();
    assert!(
        socket.exists(),
        "a killed daemon cannot have removed its socket"
    );
    mail.daemon.restart();
    notified(&pf, &agent, &mut seen, "重启之后");

    // Stopped: the socket is gone and Postfix answers 451 (milter_default_action = tempfail).
    mail.daemon.stop();
    assert!(!socket.exists(), "a stopped daemon left its socket behind");
    let r = send(&pf, "alice@dest.example", "停止之后");
    let t = transcript(&r);
    assert!(
        !r.status.success() && t.contains("<** 451"),
        "no 451 with mailbell stopped: {t}"
    );
    wait_for("two messages in the mailbox", 60, || pf.delivered() == 2);
    drop(pf);
    assert_eq!(agent.pdus().len(), seen, "an extra SMS");
}
