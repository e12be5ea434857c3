//! The one way both daemons show a phone number outside trace logs and the audit trail's own
//! masking: the country code and the next 3 digits, `*` for the middle, the last 4 digits
//! (`+86138****8000`).

/// `phone` (E.164, `+` and digits) for logs and operator output: the country code and the
/// next 3 digits, then `*` for the middle, then the last 4 digits (`+86138****8000`). At least
/// 3 digits are always masked, giving up leading and then trailing digits on short numbers.
/// Anything that is not `+` and digits has every digit but the last 4 masked.
pub fn mask_phone(phone: &str) -> String {
    let Some(d) = phone
        .strip_prefix('+')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    else {
        let n = phone.chars().count();
        return phone
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i + 4 < n && c.is_ascii_digit() {
                    '*'
                } else {
                    c
                }
            })
            .collect();
    };
    let len = d.len();
    let cc = country_code_len(d);
    let mut front = cc + 3;
    let mut back = 4;
    const MIN_MASKED: usize = 3;
    while front + back + MIN_MASKED > len && front > cc {
        front -= 1;
    }
    while front + back + MIN_MASKED > len && back > 2 {
        back -= 1;
    }
    let front = front.min(len);
    let back = back.min(len - front);
    let mut out = String::with_capacity(len + 1);
    out.push('+');
    out.push_str(d.get(..front).unwrap_or_default());
    out.extend(std::iter::repeat_n('*', len - front - back));
    out.push_str(d.get(len - back..).unwrap_or_default());
    out
}

/// Length of the ITU country code at the start of `digits` (1, 2 or 3), from the E.164 zone
/// plan: zones 1 and 7 are one digit; the listed two-digit codes; everything else three.
fn country_code_len(digits: &str) -> usize {
    let b = digits.as_bytes();
    let (Some(&z), Some(&s)) = (b.first(), b.get(1)) else {
        return 1;
    };
    let two_digit = match z {
        b'1' | b'7' => return 1,
        b'2' => matches!(s, b'0' | b'7'),
        b'3' => matches!(s, b'0'..=b'4' | b'6' | b'9'),
        b'4' => s != b'2',
        b'5' => matches!(s, b'1'..=b'8'),
        b'6' => matches!(s, b'0'..=b'6'),
        b'8' => matches!(s, b'1' | b'2' | b'4' | b'6'),
        b'9' => matches!(s, b'0'..=b'5' | b'8'),
        _ => false,
    };
    if two_digit {
        2
    } else {
        3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_country_code_and_ends() {
        assert_eq!(mask_phone("+8613800138000"), "+86138****8000");
        assert_eq!(mask_phone("+16502530000"), "+1650***0000");
        assert_eq!(mask_phone("+35312345"), "+353***45");
        assert_eq!(mask_phone("0612345678"), "******5678");
        assert_eq!(mask_phone("123"), "123");
    }

    #[test]
    fn country_code_lengths() {
        assert_eq!(country_code_len("16502530000"), 1);
        assert_eq!(country_code_len("79161234567"), 1);
        assert_eq!(country_code_len("8613800138000"), 2);
        assert_eq!(country_code_len("4915123456789"), 2);
        assert_eq!(country_code_len("420601123456"), 3);
        assert_eq!(country_code_len("852912345678"), 3);
        assert_eq!(country_code_len("971501234567"), 3);
    }
}
