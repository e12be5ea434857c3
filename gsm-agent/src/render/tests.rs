//! The renderer's tests: arrival and billing texts, cutting to the part budget, template and
//! configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// 2024-01-02 07:04:05 UTC.
const T: i64 = 1_704_179_045_000;

fn notice(language: &str, from_name: &str, subject: &str) -> Notification {
    Notification {
        phone: "+8613800138000".to_owned(),
        recipient: "alice@example.com".to_owned(),
        from_name: from_name.to_owned(),
        from_addr: "zhang.san@example.cn".to_owned(),
        subject: subject.to_owned(),
        received_at_ms: T,
        language: language.to_owned(),
        count: 1,
        max_parts: 0,
        ..Default::default()
    }
}

fn renderer() -> Renderer {
    Renderer::new(RenderConfig::default()).unwrap()
}

#[test]
fn chinese_short_subject_as_is() {
    let text = renderer().render(&notice("", "张三", "你好")).unwrap();
    assert_eq!(
        text,
        "新邮件 alice@example.com：来自 张三，主题：你好，01-02 15:04"
    );
    assert_eq!(pdu::measure(&text).alphabet, Alphabet::Ucs2);
}

#[test]
fn chinese_subject_truncated_to_one_ucs2_sms() {
    let subject = "关于下周项目评审会议的安排以及需要提前准备的材料清单和注意事项请各位同事务必在周五之前完成";
    let text = renderer().render(&notice("zh", "张三", subject)).unwrap();
    let m = pdu::measure(&text);
    assert_eq!(
        (m.alphabet, m.parts, m.units),
        (Alphabet::Ucs2, 1, 70),
        "{text}"
    );
    // 44 units of template, recipient, sender, "…" and time leave 26 for the subject.
    let kept: String = subject.chars().take(26).collect();
    assert_eq!(
        text,
        format!("新邮件 alice@example.com：来自 张三，主题：{kept}…，01-02 15:04")
    );
}

#[test]
fn english_stays_gsm7() {
    let r = renderer();
    let text = r
        .render(&notice("en", "Alice Smith", "Quarterly report"))
        .unwrap();
    assert_eq!(
        text,
        "New mail for alice@example.com from Alice Smith: Quarterly report (01-02 15:04)"
    );
    assert_eq!(pdu::measure(&text).alphabet, Alphabet::Gsm7);
    // Curly quotes and dashes become ASCII instead of forcing UCS-2.
    let text = r
        .render(&notice(
            "en",
            "Bob",
            "Don\u{2019}t miss \u{201C}it\u{201D} \u{2014} today",
        ))
        .unwrap();
    assert!(text.contains("Don't miss \"it\" - today"), "{text}");
    assert_eq!(pdu::measure(&text).alphabet, Alphabet::Gsm7);
}

#[test]
fn long_english_subject_cut_with_ascii_ellipsis() {
    let subject = "Lorem ipsum dolor sit amet ".repeat(20);
    let text = renderer().render(&notice("en", "Alice", &subject)).unwrap();
    let m = pdu::measure(&text);
    assert_eq!((m.alphabet, m.parts), (Alphabet::Gsm7, 1), "{text}");
    assert!(m.units >= 155, "cut more than needed: {} units", m.units);
    assert!(text.contains("...") && !text.contains('…'), "{text}");
    assert!(text.ends_with("... (01-02 15:04)"), "{text}");
    assert!(text.starts_with("New mail for alice@example.com from Alice: Lorem ipsum"));
}

#[test]
fn unicode_ellipsis_when_text_is_ucs2_anyway() {
    let subject = "Lorem ipsum dolor sit amet ".repeat(20);
    let text = renderer().render(&notice("en", "张三", &subject)).unwrap();
    let m = pdu::measure(&text);
    assert_eq!((m.alphabet, m.parts), (Alphabet::Ucs2, 1), "{text}");
    assert!(text.contains('…') && !text.contains("..."), "{text}");
}

#[test]
fn coalesced_count() {
    let r = renderer();
    let mut n = notice("en", "Alice", "Hi");
    n.count = 5;
    assert_eq!(
        r.render(&n).unwrap(),
        "5 new messages for alice@example.com, latest from Alice: Hi (01-02 15:04)"
    );
    n.language = "zh".to_owned();
    assert_eq!(
        r.render(&n).unwrap(),
        "5封新邮件 alice@example.com：最新来自 Alice，主题：Hi，01-02 15:04"
    );
}

#[test]
fn unknown_placeholder_rejected_by_name() {
    let mut cfg = RenderConfig::default();
    cfg.templates.insert(
        "fr".to_owned(),
        Template {
            single: "Nouveau: {subjet}".to_owned(),
            coalesced: "{count} nouveaux".to_owned(),
            ..Default::default()
        },
    );
    let err = Renderer::new(cfg).unwrap_err();
    assert_eq!(
        err,
        RenderError::UnknownPlaceholder {
            language: "fr".to_owned(),
            kind: "single",
            name: "subjet".to_owned()
        }
    );
    assert_eq!(
        err.to_string(),
        "unknown placeholder {subjet} in the single template for language \"fr\""
    );
}

/// What `Renderer::new` says of a configuration whose one template has `single` as its
/// single-notice text.
fn template_error(single: &str) -> Option<RenderError> {
    let mut cfg = RenderConfig::default();
    cfg.templates.insert(
        "x".to_owned(),
        Template {
            single: single.to_owned(),
            coalesced: "{count}".to_owned(),
            ..Default::default()
        },
    );
    Renderer::new(cfg).err()
}

#[test]
fn template_syntax_errors() {
    let check = template_error;
    assert!(matches!(
        check("a {subject"),
        Some(RenderError::UnclosedPlaceholder { .. })
    ));
    assert!(matches!(
        check("a } b"),
        Some(RenderError::UnmatchedBrace { .. })
    ));
    assert!(matches!(
        check("  "),
        Some(RenderError::EmptyTemplate { .. })
    ));
    assert_eq!(check("{{literal}} {subject}"), None);
}

#[test]
fn literal_braces() {
    let mut cfg = RenderConfig {
        default_language: "x".to_owned(),
        ..RenderConfig::default()
    };
    cfg.templates.insert(
        "x".to_owned(),
        Template {
            single: "{{{subject}}}".to_owned(),
            coalesced: "{count}".to_owned(),
            ..Default::default()
        },
    );
    let r = Renderer::new(cfg).unwrap();
    assert_eq!(r.render(&notice("", "A", "hi")).unwrap(), "{hi}");
}

#[test]
fn control_chars_stripped_and_whitespace_collapsed() {
    let n = notice(
        "en",
        "\u{202E}Mallory\u{200B}\r\n",
        "Hello\r\n\tworld\u{7}\u{1B}[31m   again\u{FEFF}",
    );
    let text = renderer().render(&n).unwrap();
    assert_eq!(
        text,
        "New mail for alice@example.com from Mallory: Hello world[31m again (01-02 15:04)"
    );
    assert!(!text.chars().any(|c| c.is_control()));
    assert_eq!(sanitize("  a \u{3000} b\n"), "a b");
    assert_eq!(sanitize("\u{0}\u{7F}\u{85}"), "");
}

#[test]
fn sender_falls_back_to_address_and_subject_placeholder() {
    let r = renderer();
    let text = r.render(&notice("en", " \t", "")).unwrap();
    assert_eq!(
        text,
        "New mail for alice@example.com from zhang.san@example.cn: (no subject) (01-02 15:04)"
    );
    let text = r.render(&notice("zh", "", "\u{7}")).unwrap();
    assert_eq!(
        text,
        "新邮件 alice@example.com：来自 zhang.san@example.cn，主题：(无主题)，01-02 15:04"
    );
}

#[test]
fn language_fallback() {
    let r = renderer();
    assert!(r
        .render(&notice("fr", "A", "x"))
        .unwrap()
        .starts_with("新邮件"));
    assert!(r
        .render(&notice("en-US", "A", "x"))
        .unwrap()
        .starts_with("New mail"));
    assert!(r
        .render(&notice("EN_gb", "A", "x"))
        .unwrap()
        .starts_with("New mail"));
    assert!(r
        .render(&notice("zh-Hans-CN", "A", "x"))
        .unwrap()
        .starts_with("新邮件"));
}

#[test]
fn max_parts_respected() {
    let r = renderer();
    let subject = "word ".repeat(400);
    let mut n = notice("en", "Alice", &subject);
    for (asked, want) in [(0, 1), (1, 1), (2, 2), (3, 3), (9, 4)] {
        n.max_parts = asked;
        assert_eq!(r.max_parts_for(&n), want);
        let text = r.render(&n).unwrap();
        let m = pdu::measure(&text);
        assert_eq!(m.parts, usize::from(want), "asked {asked}");
        assert!(
            m.units > pdu::capacity(Alphabet::Gsm7, want) - 8,
            "cut too much for {asked}"
        );
        let pdus = pdu::encode_submit(
            &"+8613800138000".parse().unwrap(),
            &text,
            &pdu::SubmitOptions {
                max_parts: want,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(pdus.len(), usize::from(want));
    }
    // Chinese text over two parts.
    let mut n = notice("zh", "张三", &"长".repeat(300));
    n.max_parts = 2;
    let m = pdu::measure(&r.render(&n).unwrap());
    assert_eq!((m.alphabet, m.parts), (Alphabet::Ucs2, 2));
    assert!(m.units > 2 * pdu::UCS2_MULTI - 2);
}

#[test]
fn sender_then_recipient_cut_when_subject_is_not_enough() {
    let r = renderer();
    let mut n = notice("zh", &"王".repeat(100), "主题");
    let text = r.render(&n).unwrap();
    assert_eq!(pdu::measure(&text).parts, 1);
    assert!(
        text.contains("主题：…，"),
        "subject cut to the ellipsis first: {text}"
    );
    assert!(text.contains("来自 王王"), "{text}");
    n.from_name = "王".to_owned();
    n.recipient = format!("{}@example.com", "x".repeat(100));
    let text = r.render(&n).unwrap();
    assert_eq!(pdu::measure(&text).parts, 1);
    assert!(text.contains("x…@example.com：来自 …，主题：…，"), "{text}");
}

#[test]
fn sole_address_leaves_the_recipient_out() {
    let r = renderer();
    let mut n = notice("zh", "张三", "你好");
    n.sole_address = true;
    assert_eq!(
        r.render(&n).unwrap(),
        "新邮件：来自 张三，主题：你好，01-02 15:04"
    );
    n.language = "en".to_owned();
    assert_eq!(
        r.render(&n).unwrap(),
        "New mail from 张三: 你好 (01-02 15:04)"
    );
    n.count = 2;
    assert_eq!(
        r.render(&n).unwrap(),
        "2 new messages, latest from 张三: 你好 (01-02 15:04)"
    );
    // A template that names {recipient} outside a section always shows it.
    let mut cfg = RenderConfig::default();
    cfg.templates.insert(
        "x".to_owned(),
        Template {
            single: "{recipient}: {subject}".to_owned(),
            coalesced: "{count}".to_owned(),
            ..Default::default()
        },
    );
    let mut n = notice("x", "A", "hi");
    n.sole_address = true;
    assert_eq!(
        Renderer::new(cfg).unwrap().render(&n).unwrap(),
        "alice@example.com: hi"
    );
}

/// Issue 9: full receiver and sender addresses left `主题：T7-7ee5 afte…` of the subject.
#[test]
fn one_part_chinese_sms_keeps_the_subject_readable() {
    let r = renderer();
    let subject = "T7-7ee5 after restart 项目评审";
    let mut n = notice("zh", "", subject);
    n.recipient = "a.li@hl.test".to_owned();
    n.from_addr = "project.office@remote-company.example.com".to_owned();
    n.sole_address = true;
    let text = r.render(&n).unwrap();
    assert_eq!(pdu::measure(&text).parts, 1, "{text}");
    assert_eq!(
        text,
        format!("新邮件：来自 project.office，主题：{subject}，01-02 15:04")
    );
    // With room to spare the sender's address is shown whole.
    n.from_addr = "bob@hl.test".to_owned();
    assert!(r.render(&n).unwrap().contains("来自 bob@hl.test，"));
}

#[test]
fn undecodable_sender_name_falls_back_to_the_address() {
    let r = renderer();
    for raw in ["=?UTF-8?B?!!!notbase64?=", "x =?gb2312?Q?=D5=C5?= y"] {
        let text = r.render(&notice("en", raw, "hi")).unwrap();
        assert_eq!(
            text, "New mail for alice@example.com from zhang.san@example.cn: hi (01-02 15:04)",
            "{raw}"
        );
    }
    // An ordinary name with "=?" in it stays.
    let text = r.render(&notice("en", "a =? b", "hi")).unwrap();
    assert!(text.contains("from a =? b:"), "{text}");
}

#[test]
fn section_syntax_errors() {
    let check = template_error;
    assert!(matches!(
        check("a {[ for {recipient} b"),
        Some(RenderError::UnclosedSection { .. })
    ));
    assert!(matches!(
        check("{[ {[ {recipient} ]} ]}"),
        Some(RenderError::UnclosedSection { .. })
    ));
    assert_eq!(check("[x]{[ for {recipient}]} {subject}"), None);
}

#[test]
fn literal_text_over_the_part_budget_is_refused() {
    let r = renderer();
    let mut n = notice("en", "A", "s");
    let two_parts = "x".repeat(161);
    assert_eq!(
        r.check_literal(&n, &two_parts),
        Err(RenderError::LiteralTooLong {
            parts: 2,
            max_parts: 1,
            cap: 4
        })
    );
    assert!(r.check_literal(&n, &"x".repeat(160)).is_ok());
    n.max_parts = 2;
    assert!(r.check_literal(&n, &two_parts).is_ok());
    // Above the cap the cap applies.
    n.max_parts = 9;
    let e = r.check_literal(&n, &"长".repeat(5 * 67)).unwrap_err();
    assert!(e.to_string().contains("max_parts_cap = 4"), "{e}");
}

#[test]
fn does_not_fit_and_empty() {
    let mut cfg = RenderConfig::default();
    cfg.templates.insert(
        "long".to_owned(),
        Template {
            single: format!("{} {{subject}}", "x".repeat(170)),
            coalesced: "{recipient}".to_owned(),
            ..Default::default()
        },
    );
    let r = Renderer::new(cfg).unwrap();
    assert_eq!(
        r.render(&notice("long", "A", "s")),
        Err(RenderError::DoesNotFit { max_parts: 1 })
    );
    let mut n = notice("long", "A", "s");
    n.count = 2;
    n.recipient = "\u{7} ".to_owned();
    assert_eq!(r.render(&n), Err(RenderError::Empty));
    let mut n = notice("long", "A", "s");
    n.max_parts = 2;
    assert!(r.render(&n).is_ok());
}

#[test]
fn config_validation() {
    let base = RenderConfig::default;
    assert!(matches!(
        Renderer::new(RenderConfig {
            default_language: "de".to_owned(),
            ..base()
        }),
        Err(RenderError::MissingDefaultLanguage(_))
    ));
    assert!(matches!(
        Renderer::new(RenderConfig {
            time_format: "%Q".to_owned(),
            ..base()
        }),
        Err(RenderError::InvalidTimeFormat(_))
    ));
    assert!(matches!(
        Renderer::new(RenderConfig {
            utc_offset_minutes: 24 * 60,
            ..base()
        }),
        Err(RenderError::InvalidUtcOffset(_))
    ));
    assert!(matches!(
        Renderer::new(RenderConfig {
            default_max_parts: 0,
            ..base()
        }),
        Err(RenderError::ZeroMaxParts("default_max_parts"))
    ));
    assert!(matches!(
        Renderer::new(RenderConfig {
            max_parts_cap: 0,
            ..base()
        }),
        Err(RenderError::ZeroMaxParts("max_parts_cap"))
    ));
    assert!(matches!(
        Renderer::new(RenderConfig {
            max_parts_cap: MAX_SMS_PARTS + 1,
            ..base()
        }),
        Err(RenderError::MaxPartsCapTooHigh(_))
    ));
}

#[test]
fn time_in_configured_offset() {
    let r = Renderer::new(RenderConfig {
        utc_offset_minutes: -5 * 60,
        time_format: "%Y-%m-%d %H:%M".to_owned(),
        ..RenderConfig::default()
    })
    .unwrap();
    let text = r.render(&notice("en", "A", "s")).unwrap();
    assert!(text.ends_with("(2024-01-02 02:04)"), "{text}");
    let mut n = notice("en", "A", "s");
    n.received_at_ms = i64::MAX;
    assert_eq!(
        r.render(&n),
        Err(RenderError::TimestampOutOfRange(i64::MAX))
    );
}

#[test]
fn template_round_trips_through_toml_shape() {
    let t: Template =
        serde_json::from_str(r#"{"single":"{subject}","coalesced":"{count}"}"#).unwrap();
    assert_eq!(t.single, "{subject}");
    assert!(serde_json::from_str::<Template>(r#"{"single":"a","coalesced":"b","x":1}"#).is_err());
}

fn billing(language: &str, kind: NoticeKind) -> Notification {
    Notification {
        id: mailbell_link::NotifId::random(),
        kind,
        phone: "+8613800138000".to_owned(),
        recipient: "alice@example.com".to_owned(),
        received_at_ms: T,
        language: language.to_owned(),
        count: 1,
        ..Default::default()
    }
}

fn dec(s: &str) -> mailbell_link::notification::DecimalText {
    s.parse().unwrap()
}

fn arrears(language: &str, balance: &str) -> Notification {
    billing(
        language,
        NoticeKind::BillingArrears {
            balance: dec(balance),
        },
    )
}

fn warning(language: &str, balance: &str, threshold: &str) -> Notification {
    billing(
        language,
        NoticeKind::BillingWarning {
            balance: dec(balance),
            threshold: dec(threshold),
        },
    )
}

#[test]
fn builtin_billing_texts() {
    let r = renderer();
    assert_eq!(
        r.render(&arrears("zh", "-3.20")).unwrap(),
        "您的邮箱 alice@example.com 余额 -3.20 元，已欠费，请尽快充值。"
    );
    assert_eq!(
        r.render(&warning("zh", "4.80", "5.00")).unwrap(),
        "您的邮箱 alice@example.com 余额 4.80 元，已低于 5.00 元，请及时充值。"
    );
    let en = r.render(&arrears("en", "-3.20")).unwrap();
    assert_eq!(
        en,
        "Your mailbox alice@example.com is in arrears: balance -3.20. Please top up soon."
    );
    assert_eq!(pdu::measure(&en).alphabet, Alphabet::Gsm7);
    assert_eq!(
        r.render(&warning("en-GB", "4.80", "5.00")).unwrap(),
        "Your mailbox alice@example.com balance is 4.80, at or below 5.00. Please top up."
    );
    // No language, or one without templates: the default language's (zh).
    assert!(r
        .render(&arrears("fr", "-1"))
        .unwrap()
        .starts_with("您的邮箱"));
    // The count and the sole-address flag of arrivals change nothing here.
    let mut n = arrears("en", "-3.20");
    n.count = 7;
    n.sole_address = true;
    assert_eq!(r.render(&n).unwrap(), en);
}

#[test]
fn billing_templates_from_config() {
    let mut cfg = RenderConfig::default();
    // An operator's own en texts: arrival only; the billing texts stay built in.
    cfg.templates.insert(
        "en".to_owned(),
        Template {
            single: "Mail: {subject}".to_owned(),
            coalesced: "{count} mails".to_owned(),
            ..Default::default()
        },
    );
    cfg.templates.insert(
        "de".to_owned(),
        Template {
            single: "Post: {subject}".to_owned(),
            coalesced: "{count} Posts".to_owned(),
            arrears: Some("{address}: Saldo {balance} ({time})".to_owned()),
            warning: Some("{address}: Saldo {balance} <= {threshold}".to_owned()),
        },
    );
    // A language with arrival texts only: the default language's billing texts.
    cfg.templates.insert(
        "fr".to_owned(),
        Template {
            single: "Courrier: {subject}".to_owned(),
            coalesced: "{count} courriers".to_owned(),
            ..Default::default()
        },
    );
    let r = Renderer::new(cfg).unwrap();
    assert!(r
        .render(&arrears("en", "-3.20"))
        .unwrap()
        .starts_with("Your mailbox alice@example.com is in arrears"));
    assert_eq!(
        r.render(&arrears("de", "-3.20")).unwrap(),
        "alice@example.com: Saldo -3.20 (01-02 15:04)"
    );
    assert_eq!(
        r.render(&warning("de", "1", "2")).unwrap(),
        "alice@example.com: Saldo 1 <= 2"
    );
    assert!(r
        .render(&warning("fr", "1", "2"))
        .unwrap()
        .starts_with("您的邮箱"));
}

#[test]
fn billing_template_errors() {
    let with = |arrears: &str, warning: &str| {
        let mut cfg = RenderConfig::default();
        cfg.templates.insert(
            "x".to_owned(),
            Template {
                single: "{subject}".to_owned(),
                coalesced: "{count}".to_owned(),
                arrears: Some(arrears.to_owned()),
                warning: Some(warning.to_owned()),
            },
        );
        Renderer::new(cfg).err()
    };
    assert_eq!(with("{balance} {address}", "{threshold} {time}"), None);
    // Arrival names have no place in a billing text, nor a threshold in arrears.
    for (a, w, kind, name) in [
        ("{subject}", "{balance}", "arrears", "subject"),
        ("{threshold}", "{balance}", "arrears", "threshold"),
        ("{balance}", "{recipient}", "warning", "recipient"),
    ] {
        assert_eq!(
            with(a, w),
            Some(RenderError::UnknownPlaceholder {
                language: "x".to_owned(),
                kind,
                name: name.to_owned()
            })
        );
    }
    let e = with("{balance", "{balance}").unwrap();
    assert_eq!(
        e.to_string(),
        "unclosed placeholder in the arrears template for language \"x\""
    );
    assert!(matches!(
        with(" ", "{balance}"),
        Some(RenderError::EmptyTemplate {
            kind: "arrears",
            ..
        })
    ));
    // And an arrival text may not name billing fields.
    assert!(matches!(
        template_error("{balance}"),
        Some(RenderError::UnknownPlaceholder { .. })
    ));
    // A default language without a billing text of its own or built in: the agent starts
    // (arrival notices work as before) and refuses such a notice, naming the key to add.
    let mut cfg = RenderConfig {
        default_language: "fr".to_owned(),
        ..RenderConfig::default()
    };
    cfg.templates.insert(
        "fr".to_owned(),
        Template {
            single: "{subject}".to_owned(),
            coalesced: "{count}".to_owned(),
            arrears: Some("{balance}".to_owned()),
            warning: None,
        },
    );
    let r = Renderer::new(cfg).unwrap();
    assert_eq!(r.missing_billing_templates(), ["warning"]);
    assert_eq!(r.render(&arrears("fr", "-1")).unwrap(), "-1");
    assert!(r
        .render(&warning("en", "1", "2"))
        .unwrap()
        .starts_with("Your mailbox"));
    let e = r.render(&warning("fr", "1", "2")).unwrap_err();
    assert_eq!(
        e,
        RenderError::MissingBillingTemplate {
            language: "fr".to_owned(),
            kind: "warning"
        }
    );
    assert!(e.to_string().contains("[sms.templates.fr]"), "{e}");
    assert!(renderer().missing_billing_templates().is_empty());
}

#[test]
fn billing_text_keeps_the_part_budget() {
    let r = renderer();
    // A long address is cut (local part first); the balance never is.
    let mut n = arrears("zh", "-1234.56");
    n.recipient = format!("{}@example.com", "x".repeat(120));
    let text = r.render(&n).unwrap();
    let m = pdu::measure(&text);
    assert_eq!((m.alphabet, m.parts), (Alphabet::Ucs2, 1), "{text}");
    assert!(text.contains("x…@example.com 余额 -1234.56 元"), "{text}");
    let mut n = warning("en", "4.80", "5.00");
    n.recipient = format!("{}@example.com", "y".repeat(200));
    let text = r.render(&n).unwrap();
    let m = pdu::measure(&text);
    assert_eq!((m.alphabet, m.parts), (Alphabet::Gsm7, 1), "{text}");
    assert!(text.contains("y...@example.com balance is 4.80, at or below 5.00"));
    n.max_parts = 2;
    assert_eq!(pdu::measure(&r.render(&n).unwrap()).parts, 2);
    // A template whose fixed text alone is over the budget does not fit.
    let mut cfg = RenderConfig::default();
    cfg.templates.insert(
        "long".to_owned(),
        Template {
            single: "{subject}".to_owned(),
            coalesced: "{count}".to_owned(),
            arrears: Some(format!("{} {{balance}}", "z".repeat(170))),
            warning: None,
        },
    );
    let r = Renderer::new(cfg).unwrap();
    assert_eq!(
        r.render(&arrears("long", "-1")),
        Err(RenderError::DoesNotFit { max_parts: 1 })
    );
}
