//! `Authentication-Results` (RFC 8601) as added by a trusted MTA: which sender domains it
//! says were authenticated. Only instances whose authserv-id is the configured one count;
//! any other (added by the sender, or by a host on the way) is ignored.
//!
//! ```text
//! Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=uni.example;
//!     dkim=pass header.d=uni.example; dmarc=pass (p=none) header.from=uni.example
//! ```
//! A domain is authenticated by `spf=pass` with `smtp.mailfrom` (address or domain) or by
//! `dmarc=pass` with `header.from`. DKIM alone is not enough: a passing signature says nothing
//! about whether its domain is the sender's.

/// Longest header value looked at; longer ones are cut (a real one is a few hundred bytes).
pub const MAX_VALUE: usize = 8192;

/// The domains a trusted header says were authenticated, lower-case.
pub fn authenticated_domains(value: &str, authserv_id: &str) -> Vec<String> {
    let value = cut(value, MAX_VALUE);
    let text = strip_comments(value);
    let mut parts = text.split(';');
    let Some(head) = parts.next() else {
        return Vec::new();
    };
    // authserv-id [ CFWS authres-version ]
    let id = head.split_whitespace().next().unwrap_or("");
    if authserv_id.is_empty() || !id.eq_ignore_ascii_case(authserv_id) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for resinfo in parts {
        let mut words = resinfo.split_whitespace();
        let Some((method, result)) = words.next().and_then(|w| w.split_once('=')) else {
            continue;
        };
        let method = method.split('/').next().unwrap_or("").to_ascii_lowercase();
        if !result.eq_ignore_ascii_case("pass") {
            continue;
        }
        let wanted = match method.as_str() {
            "spf" => "smtp.mailfrom",
            "dmarc" => "header.from",
            _ => continue,
        };
        for w in words {
            let Some((prop, val)) = w.split_once('=') else {
                continue;
            };
            if prop.eq_ignore_ascii_case(wanted) {
                let val = val.trim_matches('"');
                let domain = match val.rsplit_once('@') {
                    Some((_, d)) => d,
                    None => val,
                };
                let domain = domain.trim_end_matches('.').to_ascii_lowercase();
                if !domain.is_empty() && !out.contains(&domain) {
                    out.push(domain);
                }
            }
        }
    }
    out
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Drops `( ... )` comments (nested, with `\` quoting) and unfolds.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut depth, mut escaped, mut quoted) = (0u32, false, false);
    for c in s.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            '\r' | '\n' | '\t' if depth == 0 => out.push(' '),
            '\r' | '\n' | '\t' => {}
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "mx.example.org";

    #[test]
    fn spf_and_dmarc_pass_name_domains() {
        let v = " mx.example.org 1; spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=bob@Uni.Example;\r\n\tdkim=pass header.d=other.example; dmarc=pass (p=none dis=none) header.from=lab.example\r\n";
        assert_eq!(
            authenticated_domains(v, ID),
            vec!["uni.example", "lab.example"]
        );
    }

    #[test]
    fn failures_and_dkim_alone_authenticate_nothing() {
        for v in [
            "mx.example.org; spf=fail smtp.mailfrom=uni.example; dmarc=fail header.from=uni.example",
            "mx.example.org; dkim=pass header.d=uni.example",
            "mx.example.org; spf=softfail smtp.mailfrom=uni.example",
            "mx.example.org; none",
            "mx.example.org",
            "",
            "mx.example.org; spf=pass (smtp.mailfrom=uni.example)",
        ] {
            assert!(authenticated_domains(v, ID).is_empty(), "{v}");
        }
    }

    #[test]
    fn another_authserv_id_is_ignored() {
        // What a sender (or a relay on the way) can write itself.
        let spoofed =
            "evil.example; spf=pass smtp.mailfrom=uni.example; dmarc=pass header.from=uni.example";
        assert!(authenticated_domains(spoofed, ID).is_empty());
        let prefixed = "mx.example.org.evil; spf=pass smtp.mailfrom=uni.example";
        assert!(authenticated_domains(prefixed, ID).is_empty());
        // A comment that looks like the id does not make it the id.
        let commented = "(mx.example.org) evil.example; spf=pass smtp.mailfrom=uni.example";
        assert!(authenticated_domains(commented, ID).is_empty());
        // No configured id: nothing is trusted.
        assert!(
            authenticated_domains("mx.example.org; spf=pass smtp.mailfrom=u.example", "")
                .is_empty()
        );
    }

    #[test]
    fn case_versions_and_quoting() {
        let v = "MX.Example.ORG; SPF=Pass smtp.MailFrom=\"x@U.example\"; dmarc/1=pass header.from=V.example.";
        assert_eq!(authenticated_domains(v, ID), vec!["u.example", "v.example"]);
        let long = format!(
            "{ID}; spf=pass smtp.mailfrom=u.example; {}",
            "x".repeat(MAX_VALUE * 2)
        );
        assert_eq!(authenticated_domains(&long, ID), vec!["u.example"]);
    }
}
