//! `+CMS ERROR` / `+CME ERROR` codes sorted into classes that decide what happens next.
//!
//! A modem reports a failed submission as `+CMS ERROR: <n>` (3GPP TS 27.005 §3.2.5, with the
//! network causes of TS 24.011 and TS 23.040 passed through) and a failed general command as
//! `+CME ERROR: <n>` (TS 27.007 §9.2). The gateways we replace treat every code alike and either
//! block the queue on a poison message or give up on a temporary one (Gammu SMSD's
//! `MaxRetries`, default 1, applies to every failure alike). Here each code maps to an [`ErrorClass`], and each class carries a [`RetryPolicy`]:
//!
//! ```text
//! CMS code                          class                   what the agent does
//! 1 8 10 21 29 30 50 69             Permanent               fail, tell the admin
//! 27 28                             DestinationUnavailable  retry a few times, then fail
//! 38 41 42 47, plain ERROR          Transient               back off minutes, queue keeps moving
//! 96 304 305                        Bug                     fail at once
//! 310-316 320-322                   ModemFault              take the modem out, alarm, fail over
//! 330 331 332                       NetworkPause            pause the modem, re-register, fail over
//! 500                               Unknown                 transient, with a cap
//! 512+ (e.g. 515 busy)              Busy                    retry the same command soon
//! ```
//!
//! Only the first, second and fourth rows ([`ErrorClass::is_message_level`]) are taken as the
//! message's fault at once. Any other class can just as well be one broken modem answering
//! everything that way (a modem answering `+CMS ERROR: 500` to every submit is a common
//! failure of modem banks), so the pool sends the message through another modem first, and
//! the notice is charged an attempt (and follows the class's retry policy below) only when
//! the same failure comes back from a second modem, or again from the same modem when no
//! other one could take it.
//!
//! Codes the table does not name are classified by their range (see [`classify_cms`]).

use std::time::Duration;

/// What kind of failure a modem reported, and so who is at fault and whether to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ErrorClass {
    /// The destination can never receive this message (unassigned number, barred, rejected).
    Permanent,
    /// The destination is out of service right now (CMS 27, 28): retry a few times, then fail.
    DestinationUnavailable,
    /// The network is temporarily unable (CMS 38, 41, 42, 47, or a plain `ERROR`): back off for
    /// minutes while the rest of the queue moves on.
    Transient,
    /// Our PDU or command was invalid (CMS 96, 304, 305): retrying cannot help.
    Bug,
    /// The modem or its SIM is broken (CMS 310-316 SIM, 320-322 memory): take the modem out of
    /// service, raise an alarm and send through another modem.
    ModemFault,
    /// The modem lost the network or the SMSC (CMS 330-332): pause it, re-register, and send
    /// through another modem meanwhile.
    NetworkPause,
    /// "Unknown error" (CMS 500, CME 100): treated as transient, but with a cap on attempts.
    Unknown,
    /// The modem is busy (vendor codes 512 and above, e.g. 515): retry the same command soon.
    Busy,
}

/// How often and how fast to retry after a failure of one class.
///
/// `max_attempts` counts every attempt including the first, so `1` means "do not retry".
/// Delays grow exponentially from `base_delay` and never exceed `max_delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub base_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// The modem is at fault: stop using it for a while and send through another modem.
    pub disable_modem: bool,
}

impl RetryPolicy {
    /// The delay before attempt number `attempt` (1-based; attempt 1 has no delay).
    pub fn delay_before(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let shift = (attempt - 2).min(20);
        self.base_delay
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

const fn mins(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

impl ErrorClass {
    /// The retry policy for this class.
    ///
    /// ```text
    /// class                   attempts  base     max      disable modem
    /// Permanent               1         -        -        no   fail, tell the admin
    /// DestinationUnavailable  4         5 min    30 min   no   the phone may come back on
    /// Transient               8         1 min    30 min   no   minutes, queue keeps moving
    /// Bug                     1         -        -        no   never retry an invalid PDU
    /// ModemFault              3         5 s      1 min    yes  the message goes to another modem
    /// NetworkPause            5         30 s     10 min   yes  ditto, this modem re-registers
    /// Unknown                 3         2 min    20 min   no   transient with a cap (gammu #438)
    /// Busy                    4         1 s      8 s      no   same command again, in the driver
    /// ```
    pub fn retry_policy(&self) -> RetryPolicy {
        let (max_attempts, base_delay, max_delay, disable_modem) = match self {
            ErrorClass::Permanent => (1, Duration::ZERO, Duration::ZERO, false),
            ErrorClass::DestinationUnavailable => (4, mins(5), mins(30), false),
            ErrorClass::Transient => (8, mins(1), mins(30), false),
            ErrorClass::Bug => (1, Duration::ZERO, Duration::ZERO, false),
            ErrorClass::ModemFault => (3, Duration::from_secs(5), mins(1), true),
            ErrorClass::NetworkPause => (5, Duration::from_secs(30), mins(10), true),
            ErrorClass::Unknown => (3, mins(2), mins(20), false),
            ErrorClass::Busy => (4, Duration::from_secs(1), Duration::from_secs(8), false),
        };
        RetryPolicy {
            max_attempts,
            base_delay,
            max_delay,
            disable_modem,
        }
    }

    /// True when the modem, not the message, is at fault: the modem is cooled down (and
    /// re-initialised by its driver).
    pub fn is_modem_level(&self) -> bool {
        matches!(self, ErrorClass::ModemFault | ErrorClass::NetworkPause)
    }

    /// True when the failure is the message's on any modem (its destination or its PDU): the
    /// pool does not try another modem and the notice is charged an attempt. Every other
    /// class may be the modem's: the pool tries another modem, and only the same failure on
    /// two different modems is charged to the notice (see `modem/pool.rs` and
    /// `dispatch.rs`).
    pub fn is_message_level(&self) -> bool {
        matches!(
            self,
            ErrorClass::Permanent | ErrorClass::Bug | ErrorClass::DestinationUnavailable
        )
    }
}

/// Classifies a `+CMS ERROR: <code>`.
///
/// Codes 0-127 are network (RP) causes of TS 24.011, 128-255 are TP-FCS values of TS 23.040,
/// 300-340 are ME/SIM errors of TS 27.005 §3.2.5, 500 is "unknown error" and 512 and above are
/// vendor-specific (treated as "busy, retry later").
pub fn classify_cms(code: u16) -> ErrorClass {
    use ErrorClass::*;
    match code {
        // anchors.md §5.3, row by row
        1 | 8 | 10 | 21 | 29 | 30 | 50 | 69 => Permanent,
        27 | 28 => DestinationUnavailable,
        38 | 41 | 42 | 47 => Transient,
        96 | 304 | 305 => Bug,
        310..=316 | 320..=322 => ModemFault,
        330..=332 => NetworkPause,
        500 => Unknown,
        512.. => Busy,
        // other RP causes (24.011 §8.2.5.4)
        17 => Transient,              // network failure
        22 => DestinationUnavailable, // memory capacity exceeded (at the destination)
        31 => Unknown,                // normal, unspecified
        81 | 95 | 97..=99 => Bug,     // invalid reference, semantically incorrect, ...
        111 | 127 => Unknown,         // protocol error / interworking, unspecified
        // TP-FCS (23.040 §9.2.3.22)
        0x80..=0xAF => Bug,        // PID, DCS and command errors
        0xC0 => Busy,              // SC busy
        0xC1 => ModemFault,        // no SC subscription
        0xC2 => Transient,         // SC system failure
        0xC3 | 0xC4 => Permanent,  // invalid SME address, destination SME barred
        0xC5 => Permanent,         // SM rejected: duplicate SM
        0xC6 | 0xC7 => Bug,        // TP-VPF / TP-VP not supported
        0xD0..=0xD3 => ModemFault, // SIM SMS storage full, error in MS, ...
        0xD4 => Busy,              // SIM application toolkit busy
        // 27.005 ME errors
        300 | 301 => ModemFault, // ME failure, SMS service of ME reserved
        302 | 303 | 340 => Bug,  // operation not allowed / supported, no +CNMA expected
        317 | 318 => ModemFault, // SIM PIN2 / PUK2 required
        // remaining network causes (unassigned values) and ME codes
        0..=127 => Permanent,
        _ => Unknown,
    }
}

/// Classifies a `+CME ERROR: <code>` (TS 27.007 §9.2).
pub fn classify_cme(code: u16) -> ErrorClass {
    use ErrorClass::*;
    match code {
        0..=2 => ModemFault,     // phone failure, no connection to phone, link reserved
        3 | 4 => Bug,            // operation not allowed / not supported
        5..=9 => ModemFault,     // PH-SIM / PH-FSIM PIN and PUK
        10..=18 => ModemFault,   // SIM not inserted, PIN, PUK, failure, busy, wrong, password
        20..=23 => ModemFault,   // memory full, invalid index, not found, memory failure
        24..=27 => Bug,          // text or dial string too long / invalid characters
        30..=32 => NetworkPause, // no network service, network timeout, emergency only
        40..=48 => ModemFault,   // network personalisation PINs
        100 => Unknown,          // unknown
        103 | 106 => ModemFault, // illegal MS, illegal ME
        107..=150 => NetworkPause, // GPRS / PS services not allowed, PLMN not allowed, ...
        512.. => Busy,           // vendor-specific, e.g. 515 "please wait"
        _ => Unknown,
    }
}

/// The class of a plain `ERROR` final result (no code): transient.
pub fn classify_plain_error() -> ErrorClass {
    ErrorClass::Transient
}

/// The numeric code of a verbose `+CMS ERROR: <text>` (sent after `AT+CMEE=2`), if known.
pub fn cms_code_from_text(text: &str) -> Option<u16> {
    const TABLE: &[(&str, u16)] = &[
        ("unassigned (unallocated) number", 1),
        ("unassigned number", 1),
        ("operator determined barring", 8),
        ("call barred", 10),
        ("short message transfer rejected", 21),
        ("sm rejected", 21),
        ("destination out of service", 27),
        ("destination out of order", 27),
        ("unidentified subscriber", 28),
        ("facility rejected", 29),
        ("unknown subscriber", 30),
        ("network out of order", 38),
        ("temporary failure", 41),
        ("congestion", 42),
        ("resources unavailable, unspecified", 47),
        ("resources unavailable", 47),
        ("requested facility not subscribed", 50),
        ("requested facility not implemented", 69),
        ("invalid mandatory information", 96),
        ("me failure", 300),
        ("sms service of me reserved", 301),
        ("operation not allowed", 302),
        ("operation not supported", 303),
        ("invalid pdu mode parameter", 304),
        ("invalid text mode parameter", 305),
        ("sim not inserted", 310),
        ("sim pin required", 311),
        ("ph-sim pin required", 312),
        ("sim failure", 313),
        ("sim busy", 314),
        ("sim wrong", 315),
        ("sim puk required", 316),
        ("sim pin2 required", 317),
        ("sim puk2 required", 318),
        ("memory failure", 320),
        ("invalid memory index", 321),
        ("memory full", 322),
        ("smsc address unknown", 330),
        ("no network service", 331),
        ("network timeout", 332),
        ("no +cnma acknowledgement expected", 340),
        ("unknown error", 500),
    ];
    lookup(TABLE, text)
}

/// The numeric code of a verbose `+CME ERROR: <text>` (sent after `AT+CMEE=2`), if known.
pub fn cme_code_from_text(text: &str) -> Option<u16> {
    const TABLE: &[(&str, u16)] = &[
        ("phone failure", 0),
        ("no connection to phone", 1),
        ("phone-adaptor link reserved", 2),
        ("operation not allowed", 3),
        ("operation not supported", 4),
        ("ph-sim pin required", 5),
        ("sim not inserted", 10),
        ("sim pin required", 11),
        ("sim puk required", 12),
        ("sim failure", 13),
        ("sim busy", 14),
        ("sim wrong", 15),
        ("incorrect password", 16),
        ("sim pin2 required", 17),
        ("sim puk2 required", 18),
        ("memory full", 20),
        ("invalid index", 21),
        ("not found", 22),
        ("memory failure", 23),
        ("text string too long", 24),
        ("invalid characters in text string", 25),
        ("dial string too long", 26),
        ("invalid characters in dial string", 27),
        ("no network service", 30),
        ("network timeout", 31),
        ("network not allowed - emergency calls only", 32),
        ("unknown", 100),
    ];
    lookup(TABLE, text)
}

fn lookup(table: &[(&str, u16)], text: &str) -> Option<u16> {
    let text = text.trim().trim_matches('"').trim();
    table
        .iter()
        .find(|(t, _)| t.eq_ignore_ascii_case(text))
        .map(|&(_, code)| code)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ErrorClass::*;

    /// Every row of the class table in this module's docs.
    #[test]
    fn cms_table_of_anchors_5_3() {
        let rows: &[(&[u16], ErrorClass)] = &[
            (&[1, 8, 10, 21, 29, 30, 50, 69], Permanent),
            (&[27, 28], DestinationUnavailable),
            (&[38, 41, 42, 47], Transient),
            (&[96, 304, 305], Bug),
            (
                &[310, 311, 312, 313, 314, 315, 316, 320, 321, 322],
                ModemFault,
            ),
            (&[330, 331, 332], NetworkPause),
            (&[500], Unknown),
            (&[512, 515, 600, u16::MAX], Busy),
        ];
        for (codes, class) in rows {
            for &code in codes.iter() {
                assert_eq!(classify_cms(code), *class, "CMS {code}");
            }
        }
    }

    #[test]
    fn cms_codes_outside_the_table() {
        assert_eq!(classify_cms(17), Transient);
        assert_eq!(classify_cms(22), DestinationUnavailable);
        assert_eq!(classify_cms(2), Permanent);
        assert_eq!(classify_cms(0xC0), Busy);
        assert_eq!(classify_cms(0xC3), Permanent);
        assert_eq!(classify_cms(302), Bug);
        assert_eq!(classify_cms(317), ModemFault);
        assert_eq!(classify_cms(350), Unknown);
        assert_eq!(classify_cms(511), Unknown);
    }

    #[test]
    fn cme_classes() {
        for code in 10..=18 {
            assert_eq!(classify_cme(code), ModemFault, "CME {code}");
        }
        for code in 30..=32 {
            assert_eq!(classify_cme(code), NetworkPause, "CME {code}");
        }
        assert_eq!(classify_cme(100), Unknown);
        assert_eq!(classify_cme(515), Busy);
        assert_eq!(classify_cme(3), Bug);
        assert_eq!(classify_cme(0), ModemFault);
        assert_eq!(classify_cme(111), NetworkPause);
        assert_eq!(classify_cme(200), Unknown);
        assert_eq!(classify_plain_error(), Transient);
    }

    #[test]
    fn retry_policies_follow_the_table() {
        for class in [Permanent, Bug] {
            assert_eq!(class.retry_policy().max_attempts, 1, "{class:?}");
        }
        for class in [ModemFault, NetworkPause] {
            assert!(class.retry_policy().disable_modem, "{class:?}");
            assert!(class.is_modem_level());
        }
        for class in [
            Permanent,
            DestinationUnavailable,
            Transient,
            Bug,
            Unknown,
            Busy,
        ] {
            assert!(!class.retry_policy().disable_modem, "{class:?}");
            assert!(!class.is_modem_level());
        }
        // only the destination and PDU classes are the message's at once
        for class in [Permanent, Bug, DestinationUnavailable] {
            assert!(class.is_message_level(), "{class:?}");
        }
        for class in [Transient, ModemFault, NetworkPause, Unknown, Busy] {
            assert!(!class.is_message_level(), "{class:?}");
        }
        // the transient classes back off in minutes, busy in seconds
        assert!(Transient.retry_policy().base_delay >= Duration::from_secs(60));
        assert!(Busy.retry_policy().base_delay <= Duration::from_secs(2));
        // unknown is capped below transient
        assert!(Unknown.retry_policy().max_attempts < Transient.retry_policy().max_attempts);
        assert!(DestinationUnavailable.retry_policy().max_attempts > 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = Transient.retry_policy();
        assert_eq!(p.delay_before(1), Duration::ZERO);
        assert_eq!(p.delay_before(2), mins(1));
        assert_eq!(p.delay_before(3), mins(2));
        assert_eq!(p.delay_before(4), mins(4));
        assert_eq!(p.delay_before(30), mins(30));
        assert_eq!(p.delay_before(u32::MAX), mins(30));
    }

    #[test]
    fn verbose_error_texts() {
        assert_eq!(cms_code_from_text("SMSC address unknown"), Some(330));
        assert_eq!(cms_code_from_text(" unknown error "), Some(500));
        assert_eq!(cms_code_from_text("Temporary failure"), Some(41));
        assert_eq!(cms_code_from_text("something else"), None);
        assert_eq!(cme_code_from_text("SIM PIN required"), Some(11));
        assert_eq!(cme_code_from_text("incorrect password"), Some(16));
        assert_eq!(cme_code_from_text("unknown"), Some(100));
    }
}
