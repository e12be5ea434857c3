//! SMS-SUBMIT PDUs for `AT+CMGS` in PDU mode (3GPP TS 23.040 §9.2.2.2, alphabets from
//! TS 23.038 §6.2). Sans-I/O: strings in, hex strings out.
//!
//! ```text
//! PDU   = SCA TPDU                      hex of it goes after the AT+CMGS=<tpdu_len> prompt
//! SCA   = 00                            length 0: the modem uses its stored SMSC
//! TPDU  = FO MR DA PID DCS [VP] UDL UD
//!   FO  = 0b0 UDHI SRR VPF(2) RD=0 MTI=01   UDHI when concatenated, SRR on request,
//!                                           VPF=10 (relative, 1 octet) when a validity is set
//!   MR  = 00                            the modem assigns the message reference
//!   DA  = ndigits TOA semi-octets       TOA 91 (international, ISDN); digits nibble-swapped,
//!                                       odd count padded with F: +8613800138000 -> 0D91683108108300F0
//!   PID = 00      DCS = 00 (GSM 7-bit default alphabet) | 08 (UCS-2)
//!   UDL = septets (GSM-7, UDH and fill bits included) | octets (UCS-2, UDH included)
//!   UD  = [UDH] text
//!   UDH = 05 00 03 ref total seq        8-bit reference concatenation; GSM-7 text then starts
//!                                       after 1 fill bit, on the 8th septet
//! ```
//! Lengths (user data is 140 octets): 160 septets or 70 UTF-16 units in a single part; 153 / 67
//! per part with the 6-octet UDH. Extension-table characters (`€ [ ] { } ^ ~ \ |` and form feed)
//! take 2 septets (ESC + code) and a part never ends between the two; a part never ends inside a
//! UTF-16 surrogate pair either, so each part decodes on its own.
//!
//! Hand-written rather than taken from a crate: `sms-pdu` 1.1.0 picks a random concatenation
//! reference, splits concatenated text at fixed septet/octet offsets (cutting escape and
//! surrogate pairs) and unwraps internally; `serial-codec`, which has the right API, is not on
//! crates.io.

use std::time::Duration;

use crate::phone::E164;

/// Septets in a single GSM-7 part.
pub const GSM7_SINGLE: usize = 160;
/// Septets in each part of a concatenated GSM-7 message (8-bit reference UDH).
pub const GSM7_MULTI: usize = 153;
/// UTF-16 units in a single UCS-2 part.
pub const UCS2_SINGLE: usize = 70;
/// UTF-16 units in each part of a concatenated UCS-2 message (8-bit reference UDH).
pub const UCS2_MULTI: usize = 67;
/// Largest PDU (SCA included) [`decode_submit`] looks at: a 12-octet SCA plus the largest
/// SMS-SUBMIT TPDU (7 header octets, 12 address octets, 7 VP octets, 140 UD octets).
pub const MAX_PDU_OCTETS: usize = 12 + 164;

const ESC: u8 = 0x1B;
const TOA_INTERNATIONAL: u8 = 0x91;
const IEI_CONCAT_8: u8 = 0x00;
const IEI_CONCAT_16: u8 = 0x08;
const IEI_NATIONAL_SINGLE_SHIFT: u8 = 0x24;
const IEI_NATIONAL_LOCKING_SHIFT: u8 = 0x25;
const MAX_UD_OCTETS: usize = 140;

/// GSM 7-bit default alphabet (TS 23.038 §6.2.1), indexed by septet. 0x1B is the escape to the
/// extension table and never maps a character (see [`gsm7_lookup`]).
const GSM7_BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// GSM 7-bit default alphabet extension table (TS 23.038 §6.2.1.1): code after ESC, character.
const GSM7_EXT: [(u8, char); 10] = [
    (0x0A, '\u{0C}'),
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

/// ASCII code point -> septet in the basic table, 0xFF when not there (fast path for
/// [`gsm7_lookup`], which [`measure`] runs on every character).
const ASCII_TO_GSM7: [u8; 128] = {
    let mut map = [0xFF_u8; 128];
    let mut septet = 0;
    while septet < 128 {
        let c = GSM7_BASIC[septet] as u32;
        if c < 128 && septet != ESC as usize {
            map[c as usize] = septet as u8;
        }
        septet += 1;
    }
    map
};

/// How a character is written in GSM-7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gsm7 {
    Basic(u8),
    /// Written as ESC then this code.
    Ext(u8),
}

fn gsm7_lookup(c: char) -> Option<Gsm7> {
    let cp = c as u32;
    if cp < 128 {
        let septet = ASCII_TO_GSM7[cp as usize];
        if septet != 0xFF {
            return Some(Gsm7::Basic(septet));
        }
    } else if let Some(septet) = GSM7_BASIC.iter().position(|&b| b == c) {
        return u8::try_from(septet).ok().map(Gsm7::Basic);
    }
    GSM7_EXT
        .iter()
        .find(|&&(_, e)| e == c)
        .map(|&(code, _)| Gsm7::Ext(code))
}

/// Whether `c` can be sent in GSM-7, from the default table or the extension table.
pub fn is_gsm7(c: char) -> bool {
    gsm7_lookup(c).is_some()
}

/// The alphabet of a message, DCS 00 or 08.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alphabet {
    Gsm7,
    Ucs2,
}

impl Alphabet {
    /// The alphabet `text` is sent in: GSM-7 when every character is in the default or the
    /// extension table, otherwise UCS-2.
    pub fn for_text(text: &str) -> Alphabet {
        if text.chars().all(is_gsm7) {
            Alphabet::Gsm7
        } else {
            Alphabet::Ucs2
        }
    }

    /// (units in a single part, units per part of a concatenated message).
    fn limits(self) -> (usize, usize) {
        match self {
            Alphabet::Gsm7 => (GSM7_SINGLE, GSM7_MULTI),
            Alphabet::Ucs2 => (UCS2_SINGLE, UCS2_MULTI),
        }
    }

    /// Units one character takes: septets (2 for the extension table) or UTF-16 units.
    fn width(self, c: char) -> usize {
        match self {
            Alphabet::Gsm7 => match gsm7_lookup(c) {
                Some(Gsm7::Ext(_)) => 2,
                _ => 1,
            },
            Alphabet::Ucs2 => c.len_utf16(),
        }
    }

    fn dcs(self) -> u8 {
        match self {
            Alphabet::Gsm7 => 0x00,
            Alphabet::Ucs2 => 0x08,
        }
    }
}

/// How long a text is as an SMS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    pub alphabet: Alphabet,
    /// Septets (GSM-7) or UTF-16 units (UCS-2).
    pub units: usize,
    /// Parts needed; 1 for an empty text.
    pub parts: usize,
}

/// Measures `text` exactly as [`encode_submit`] would split it.
pub fn measure(text: &str) -> Measure {
    let alphabet = Alphabet::for_text(text);
    let units = text.chars().map(|c| alphabet.width(c)).sum();
    let (single, multi) = alphabet.limits();
    let parts = if units <= single {
        1
    } else {
        let mut parts = 1;
        let mut used = 0;
        for w in text.chars().map(|c| alphabet.width(c)) {
            if used + w > multi {
                parts += 1;
                used = 0;
            }
            used += w;
        }
        parts
    };
    Measure {
        alphabet,
        units,
        parts,
    }
}

/// Units that fit in `parts` parts (0 for 0 parts). For GSM-7 text with extension characters
/// near part boundaries the real figure can be one septet less per boundary; [`measure`] is
/// exact.
pub fn capacity(alphabet: Alphabet, parts: u8) -> usize {
    let (single, multi) = alphabet.limits();
    match parts {
        0 => 0,
        1 => single,
        n => usize::from(n) * multi,
    }
}

/// The text split into the bodies of its parts, on character boundaries.
fn split(text: &str, alphabet: Alphabet) -> Vec<&str> {
    let (single, multi) = alphabet.limits();
    let units: usize = text.chars().map(|c| alphabet.width(c)).sum();
    if units <= single {
        return vec![text];
    }
    let mut parts = Vec::with_capacity(units / multi + 1);
    let mut start = 0;
    let mut used = 0;
    for (i, c) in text.char_indices() {
        let w = alphabet.width(c);
        if used + w > multi {
            parts.push(&text[start..i]);
            start = i;
            used = 0;
        }
        used += w;
    }
    parts.push(&text[start..]);
    parts
}

/// One `AT+CMGS` submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitPdu {
    /// The `<length>` for `AT+CMGS`: TPDU octets, the SCA octet excluded.
    pub tpdu_len: usize,
    /// Uppercase hex of the whole PDU, starting with the `00` SCA length.
    pub hex: String,
    /// 1-based position of this part.
    pub part: u8,
    /// Number of parts of the message.
    pub parts: u8,
}

/// Knobs for [`encode_submit`].
#[derive(Clone, Debug)]
pub struct SubmitOptions {
    /// Most parts the message may take (at least 1).
    pub max_parts: u8,
    /// Concatenation reference written in the UDH of every part of a multipart message.
    pub concat_ref: u8,
    /// Sets TP-SRR so the SMSC sends a status report.
    pub request_status_report: bool,
    /// Relative validity period, rounded up to the next value TP-VP can hold (5 minutes to
    /// 63 weeks); `None` leaves it to the SMSC.
    pub validity: Option<Duration>,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        SubmitOptions {
            max_parts: 1,
            concat_ref: 0,
            request_status_report: false,
            validity: None,
        }
    }
}

/// Why a PDU could not be built or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PduError {
    #[error("message text is empty")]
    Empty,
    #[error("message needs {needed} parts but at most {max} are allowed")]
    TooLong { needed: usize, max: u8 },
    #[error("max_parts must be at least 1")]
    ZeroMaxParts,
    #[error("pdu is {len} octets, more than the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("odd number of hex digits")]
    OddHexLength,
    #[error("invalid hex digit at offset {offset}")]
    InvalidHex { offset: usize },
    #[error("pdu truncated in {field}")]
    Truncated { field: &'static str },
    #[error("{extra} unexpected octets after the user data")]
    TrailingData { extra: usize },
    #[error("not an sms-submit pdu (message type indicator {mti})")]
    NotSubmit { mti: u8 },
    #[error("invalid destination address: {0}")]
    InvalidAddress(&'static str),
    #[error("unsupported data coding scheme 0x{0:02X}")]
    UnsupportedDcs(u8),
    #[error("invalid user data header: {0}")]
    InvalidUdh(&'static str),
    #[error("invalid user data: {0}")]
    InvalidUserData(&'static str),
    #[error("unsupported pdu feature: {0}")]
    Unsupported(&'static str),
}

/// Encodes `text` to `dest` as one SMS-SUBMIT, or as concatenated parts when it does not fit
/// one part.
pub fn encode_submit(
    dest: &E164,
    text: &str,
    opts: &SubmitOptions,
) -> Result<Vec<SubmitPdu>, PduError> {
    if text.is_empty() {
        return Err(PduError::Empty);
    }
    if opts.max_parts == 0 {
        return Err(PduError::ZeroMaxParts);
    }
    let alphabet = Alphabet::for_text(text);
    let bodies = split(text, alphabet);
    if bodies.len() > usize::from(opts.max_parts) {
        return Err(PduError::TooLong {
            needed: bodies.len(),
            max: opts.max_parts,
        });
    }
    // max_parts is a u8, so this holds after the check above.
    let parts = u8::try_from(bodies.len()).map_err(|_| PduError::TooLong {
        needed: bodies.len(),
        max: opts.max_parts,
    })?;
    let mut out = Vec::with_capacity(bodies.len());
    for (seq, body) in (1..=parts).zip(bodies) {
        let udh = (parts > 1).then_some([0x05, IEI_CONCAT_8, 0x03, opts.concat_ref, parts, seq]);
        let bytes = build_tpdu(
            dest.digits(),
            TOA_INTERNATIONAL,
            alphabet,
            body,
            udh.as_ref().map(|u| &u[..]),
            opts,
        );
        out.push(SubmitPdu {
            tpdu_len: bytes.len() - 1,
            hex: hex::encode_upper(&bytes),
            part: seq,
            parts,
        });
    }
    Ok(out)
}

/// The whole PDU (SCA octet first) for one part. `body` must fit one part of its kind and be
/// all-GSM-7 when `alphabet` is GSM-7.
fn build_tpdu(
    digits: &str,
    toa: u8,
    alphabet: Alphabet,
    body: &str,
    udh: Option<&[u8]>,
    opts: &SubmitOptions,
) -> Vec<u8> {
    let mut pdu = Vec::with_capacity(MAX_PDU_OCTETS);
    pdu.push(0x00); // SCA: the modem's SMSC
    let mut fo = 0x01; // TP-MTI = SMS-SUBMIT
    if opts.validity.is_some() {
        fo |= 0b10 << 3; // TP-VPF = relative
    }
    if opts.request_status_report {
        fo |= 1 << 5;
    }
    if udh.is_some() {
        fo |= 1 << 6;
    }
    pdu.push(fo);
    pdu.push(0x00); // TP-MR
    push_address(&mut pdu, digits, toa);
    pdu.push(0x00); // TP-PID
    pdu.push(alphabet.dcs());
    if let Some(v) = opts.validity {
        pdu.push(relative_validity(v));
    }
    let udh = udh.unwrap_or_default();
    match alphabet {
        Alphabet::Gsm7 => {
            let septets = gsm7_septets(body);
            // Header septets: the UDH octets plus fill bits up to a septet boundary.
            let header_septets = (udh.len() * 8).div_ceil(7);
            let udl = header_septets + septets.len();
            let mut ud = vec![0u8; (udl * 7).div_ceil(8)];
            ud[..udh.len()].copy_from_slice(udh);
            pack_septets(&mut ud, header_septets * 7, &septets);
            pdu.push(udl as u8);
            pdu.extend_from_slice(&ud);
        }
        Alphabet::Ucs2 => {
            let units = body.encode_utf16().count();
            pdu.push((udh.len() + 2 * units) as u8);
            pdu.extend_from_slice(udh);
            for u in body.encode_utf16() {
                pdu.extend_from_slice(&u.to_be_bytes());
            }
        }
    }
    pdu
}

/// TP-DA: digit count, type of address, digits as swapped semi-octets padded with F.
fn push_address(pdu: &mut Vec<u8>, digits: &str, toa: u8) {
    let d = digits.as_bytes();
    pdu.push(d.len() as u8);
    pdu.push(toa);
    for pair in d.chunks(2) {
        let lo = pair[0] - b'0';
        let hi = pair.get(1).map_or(0x0F, |&c| c - b'0');
        pdu.push(hi << 4 | lo);
    }
}

/// Septets for an all-GSM-7 text; characters outside both tables (never passed in) become '?'.
fn gsm7_septets(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    for c in text.chars() {
        match gsm7_lookup(c) {
            Some(Gsm7::Basic(s)) => out.push(s),
            Some(Gsm7::Ext(code)) => out.extend_from_slice(&[ESC, code]),
            None => out.push(b'?'),
        }
    }
    out
}

/// Writes septets LSB-first into `buf` from bit `start_bit` on. `buf` must be large enough.
fn pack_septets(buf: &mut [u8], start_bit: usize, septets: &[u8]) {
    for (i, &s) in septets.iter().enumerate() {
        let bit = start_bit + 7 * i;
        let (byte, shift) = (bit / 8, bit % 8);
        let s = u16::from(s & 0x7F) << shift;
        if let Some(b) = buf.get_mut(byte) {
            *b |= s as u8;
        }
        if shift > 1 {
            if let Some(b) = buf.get_mut(byte + 1) {
                *b |= (s >> 8) as u8;
            }
        }
    }
}

/// Reads `count` septets from `buf` starting at bit `start_bit`.
fn unpack_septets(buf: &[u8], start_bit: usize, count: usize) -> Result<Vec<u8>, PduError> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let bit = start_bit + 7 * i;
        let (byte, shift) = (bit / 8, bit % 8);
        let lo = buf
            .get(byte)
            .ok_or(PduError::Truncated { field: "user data" })?;
        let mut v = u16::from(*lo) >> shift;
        if shift > 1 {
            let hi = buf
                .get(byte + 1)
                .ok_or(PduError::Truncated { field: "user data" })?;
            v |= u16::from(*hi) << (8 - shift);
        }
        out.push((v & 0x7F) as u8);
    }
    Ok(out)
}

/// TP-VP, relative format (TS 23.040 §9.2.3.12.1): the shortest period not below `d`,
/// clamped to 5 minutes .. 63 weeks.
pub fn relative_validity(d: Duration) -> u8 {
    let mins = d.as_secs().div_ceil(60);
    let vp = if mins <= 12 * 60 {
        mins.div_ceil(5).max(1) - 1 // (VP + 1) * 5 minutes
    } else if mins <= 24 * 60 {
        143 + (mins - 12 * 60).div_ceil(30) // 12 h + (VP - 143) * 30 minutes
    } else if mins <= 30 * 24 * 60 {
        166 + mins.div_ceil(24 * 60) // (VP - 166) days
    } else {
        192 + mins.div_ceil(7 * 24 * 60) // (VP - 192) weeks
    };
    u8::try_from(vp).unwrap_or(u8::MAX)
}

/// The period a relative TP-VP stands for.
pub fn relative_validity_duration(vp: u8) -> Duration {
    let vp = u64::from(vp);
    let mins = match vp {
        0..=143 => (vp + 1) * 5,
        144..=167 => 12 * 60 + (vp - 143) * 30,
        168..=196 => (vp - 166) * 24 * 60,
        _ => (vp - 192) * 7 * 24 * 60,
    };
    Duration::from_secs(mins * 60)
}

/// An SMS-SUBMIT read back from hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSubmit {
    /// `+` and digits for an international TOA, the bare digits otherwise.
    pub destination: String,
    pub alphabet: Alphabet,
    /// (reference, total, sequence) of an 8-bit reference concatenation UDH.
    pub concat: Option<(u8, u8, u8)>,
    pub text: String,
    pub status_report: bool,
}

/// Octet reader that reports which field ran out.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PduError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(PduError::Truncated { field })?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(PduError::Truncated { field })?;
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, PduError> {
        Ok(self.take(1, field)?[0])
    }
}

/// Reads a PDU as [`encode_submit`] writes it (any SCA accepted). Surrounding ASCII whitespace
/// is ignored; anything malformed is an error.
pub fn decode_submit(hex: &str) -> Result<DecodedSubmit, PduError> {
    let hex = hex.trim_ascii();
    if hex.len() > MAX_PDU_OCTETS * 2 {
        return Err(PduError::TooLarge {
            len: hex.len().div_ceil(2),
            max: MAX_PDU_OCTETS,
        });
    }
    let bytes = hex::decode(hex).map_err(|e| match e {
        hex::FromHexError::InvalidHexCharacter { index, .. } => {
            PduError::InvalidHex { offset: index }
        }
        _ => PduError::OddHexLength,
    })?;
    let mut r = Reader {
        buf: &bytes,
        pos: 0,
    };

    let sca_len = r.byte("service centre address")?;
    if sca_len > 11 {
        return Err(PduError::Unsupported(
            "service centre address longer than 11 octets",
        ));
    }
    r.take(usize::from(sca_len), "service centre address")?;

    let fo = r.byte("first octet")?;
    let mti = fo & 0b11;
    if mti != 0b01 {
        return Err(PduError::NotSubmit { mti });
    }
    let vpf = (fo >> 3) & 0b11;
    let status_report = fo & (1 << 5) != 0;
    let udhi = fo & (1 << 6) != 0;
    r.byte("message reference")?;

    let destination = read_address(&mut r)?;
    r.byte("protocol identifier")?;
    let alphabet = alphabet_from_dcs(r.byte("data coding scheme")?)?;
    match vpf {
        0b00 => {}
        0b10 => {
            r.byte("validity period")?;
        }
        _ => {
            r.take(7, "validity period")?;
        }
    }

    let udl = usize::from(r.byte("user data length")?);
    let ud_octets = match alphabet {
        Alphabet::Gsm7 if udl > GSM7_SINGLE => {
            return Err(PduError::InvalidUserData(
                "user data length over 160 septets",
            ))
        }
        Alphabet::Gsm7 => (udl * 7).div_ceil(8),
        Alphabet::Ucs2 if udl > MAX_UD_OCTETS => {
            return Err(PduError::InvalidUserData(
                "user data length over 140 octets",
            ))
        }
        Alphabet::Ucs2 => udl,
    };
    let ud = r.take(ud_octets, "user data")?;
    if r.pos != bytes.len() {
        return Err(PduError::TrailingData {
            extra: bytes.len() - r.pos,
        });
    }

    let (concat, header_octets) = if udhi {
        let udhl = usize::from(
            *ud.first()
                .ok_or(PduError::InvalidUdh("missing header length"))?,
        );
        let header = ud
            .get(1..1 + udhl)
            .ok_or(PduError::InvalidUdh("header longer than the user data"))?;
        (parse_udh(header)?, 1 + udhl)
    } else {
        (None, 0)
    };

    let text = match alphabet {
        Alphabet::Gsm7 => {
            let header_septets = (header_octets * 8).div_ceil(7);
            let count = udl
                .checked_sub(header_septets)
                .ok_or(PduError::InvalidUdh("header longer than the user data"))?;
            let septets = unpack_septets(ud, header_septets * 7, count)?;
            gsm7_decode(&septets)?
        }
        Alphabet::Ucs2 => {
            let body = ud
                .get(header_octets..)
                .ok_or(PduError::InvalidUdh("header longer than the user data"))?;
            if body.len() % 2 != 0 {
                return Err(PduError::InvalidUserData("odd number of ucs-2 octets"));
            }
            let units = body
                .chunks_exact(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map_err(|_| PduError::InvalidUserData("unpaired utf-16 surrogate"))?
        }
    };

    Ok(DecodedSubmit {
        destination,
        alphabet,
        concat,
        text,
        status_report,
    })
}

fn read_address(r: &mut Reader<'_>) -> Result<String, PduError> {
    let ndigits = usize::from(r.byte("destination address")?);
    if ndigits > 20 {
        return Err(PduError::InvalidAddress("more than 20 digits"));
    }
    let toa = r.byte("destination address")?;
    if toa & 0x80 == 0 {
        return Err(PduError::InvalidAddress(
            "type of address without its high bit",
        ));
    }
    let ton = (toa >> 4) & 0b111;
    if ton == 0b101 {
        return Err(PduError::Unsupported("alphanumeric destination address"));
    }
    let octets = r.take(ndigits.div_ceil(2), "destination address")?;
    let mut out = String::with_capacity(ndigits + 1);
    if ton == 0b001 {
        out.push('+');
    }
    for i in 0..ndigits {
        let octet = octets[i / 2];
        let nibble = if i % 2 == 0 { octet & 0x0F } else { octet >> 4 };
        out.push(match nibble {
            0..=9 => char::from(b'0' + nibble),
            0x0A => '*',
            0x0B => '#',
            0x0C => 'a',
            0x0D => 'b',
            0x0E => 'c',
            _ => return Err(PduError::InvalidAddress("filler nibble inside the number")),
        });
    }
    if ndigits % 2 == 1 && octets.last().is_some_and(|o| o >> 4 != 0x0F) {
        return Err(PduError::InvalidAddress("odd digit count without F filler"));
    }
    if ton == 0b001 && !out[1..].bytes().all(|b| b.is_ascii_digit()) {
        return Err(PduError::InvalidAddress(
            "non-digit in an international number",
        ));
    }
    Ok(out)
}

/// TP-DCS (TS 23.038 §4) to an alphabet; compressed and 8-bit data are not supported.
fn alphabet_from_dcs(dcs: u8) -> Result<Alphabet, PduError> {
    match dcs >> 4 {
        // General data coding (00xx) and automatic deletion group (01xx).
        0x0..=0x7 => {
            if dcs & 0x20 != 0 {
                return Err(PduError::Unsupported("compressed user data"));
            }
            match (dcs >> 2) & 0b11 {
                0b00 => Ok(Alphabet::Gsm7),
                0b10 => Ok(Alphabet::Ucs2),
                _ => Err(PduError::UnsupportedDcs(dcs)),
            }
        }
        // Message waiting indication, discard / store: GSM-7; store: UCS-2.
        0xC | 0xD => Ok(Alphabet::Gsm7),
        0xE => Ok(Alphabet::Ucs2),
        // Data coding / message class: bit 2 chooses GSM-7 or 8-bit.
        0xF if dcs & 0x04 == 0 => Ok(Alphabet::Gsm7),
        _ => Err(PduError::UnsupportedDcs(dcs)),
    }
}

fn parse_udh(mut h: &[u8]) -> Result<Option<(u8, u8, u8)>, PduError> {
    let mut concat = None;
    while let [iei, len, rest @ ..] = h {
        let len = usize::from(*len);
        let data = rest.get(..len).ok_or(PduError::InvalidUdh(
            "information element overruns the header",
        ))?;
        match *iei {
            IEI_CONCAT_8 => {
                let &[r, total, seq] = data else {
                    return Err(PduError::InvalidUdh(
                        "concatenation element is not 3 octets",
                    ));
                };
                if total == 0 || seq == 0 || seq > total {
                    return Err(PduError::InvalidUdh("concatenation sequence out of range"));
                }
                if concat.replace((r, total, seq)).is_some() {
                    return Err(PduError::InvalidUdh("repeated concatenation element"));
                }
            }
            IEI_CONCAT_16 => return Err(PduError::Unsupported("16-bit concatenation reference")),
            IEI_NATIONAL_SINGLE_SHIFT | IEI_NATIONAL_LOCKING_SHIFT => {
                return Err(PduError::Unsupported("national language shift tables"))
            }
            _ => {} // other elements do not change the text
        }
        h = &rest[len..];
    }
    if !h.is_empty() {
        return Err(PduError::InvalidUdh(
            "information element overruns the header",
        ));
    }
    Ok(concat)
}

/// Septets to text. An ESC followed by a code missing from the extension table shows the
/// basic-table character (TS 23.038 §6.2.1.1); a trailing ESC is an error.
fn gsm7_decode(septets: &[u8]) -> Result<String, PduError> {
    let mut out = String::with_capacity(septets.len());
    let mut it = septets.iter();
    while let Some(&s) = it.next() {
        if s == ESC {
            let &code = it
                .next()
                .ok_or(PduError::InvalidUserData("escape at the end of the text"))?;
            if code == ESC {
                return Err(PduError::Unsupported("second extension table"));
            }
            let c = GSM7_EXT
                .iter()
                .find(|&&(k, _)| k == code)
                .map_or(GSM7_BASIC[usize::from(code & 0x7F)], |&(_, c)| c);
            out.push(c);
        } else {
            out.push(GSM7_BASIC[usize::from(s & 0x7F)]);
        }
    }
    Ok(out)
}

// Cross-checked by hand against an independent decoder, Python `smspdudecoder` 2.2.0
// (`read_outgoing_sms` and `fields.SMSSubmit.decode`), on PDUs from `encode_submit` to
// +8613800138000 with SRR and a 24 h validity: "hellohello"; "How are you doing? €5 [ok] {x}
// ~^|\ @£$ ÄÖÑÜ §¿" (extension table); a Chinese + emoji UCS-2 text; a 2-part GSM-7 text with
// "€" pushed to part 2 (152 + escape + 26 chars); a 2-part UCS-2 text with the emoji pushed to
// part 2. It read back the same texts, number 8613800138000 with TON international / NPI isdn,
// SRR set, VPF relative with VP 167 (24 h), and UDH IEI 0 ref 66 total 2 seq 1/2, and each
// tpdu_len matched the hex length.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn dest() -> E164 {
        "+8613800138000".parse().unwrap()
    }

    fn opts(max_parts: u8) -> SubmitOptions {
        SubmitOptions {
            max_parts,
            concat_ref: 0x42,
            request_status_report: false,
            validity: None,
        }
    }

    fn packed(text: &str) -> String {
        let septets = gsm7_septets(text);
        let mut buf = vec![0u8; (septets.len() * 7).div_ceil(8)];
        pack_septets(&mut buf, 0, &septets);
        hex::encode_upper(buf)
    }

    #[test]
    fn gsm7_packing_known_vectors() {
        assert_eq!(packed("hellohello"), "E8329BFD4697D9EC37");
        assert_eq!(
            packed("How are you doing?"),
            "C8F71D14969741F9771D447EA7DDE71F"
        );
        let septets = gsm7_septets("hellohello");
        let buf = hex::decode("E8329BFD4697D9EC37").unwrap();
        assert_eq!(unpack_septets(&buf, 0, septets.len()).unwrap(), septets);
    }

    #[test]
    fn national_vector_from_node_sms_pdu() {
        let bytes = build_tpdu(
            "09012345678",
            0x81,
            Alphabet::Gsm7,
            "How are you doing?",
            None,
            &opts(1),
        );
        assert_eq!(
            hex::encode_upper(&bytes),
            "0001000B819010325476F8000012C8F71D14969741F9771D447EA7DDE71F"
        );
        let d =
            decode_submit("0001000B819010325476F8000012C8F71D14969741F9771D447EA7DDE71F").unwrap();
        assert_eq!(d.destination, "09012345678");
        assert_eq!(d.text, "How are you doing?");
    }

    #[test]
    fn international_single_part() {
        let pdus = encode_submit(&dest(), "hellohello", &opts(1)).unwrap();
        assert_eq!(pdus.len(), 1);
        let p = &pdus[0];
        assert_eq!(p.hex, "0001000D91683108108300F000000AE8329BFD4697D9EC37");
        assert!(p.hex.contains("0D91683108108300F0"));
        assert_eq!(p.tpdu_len, p.hex.len() / 2 - 1);
        assert_eq!((p.part, p.parts), (1, 1));
    }

    #[test]
    fn first_octet_flags_and_validity() {
        let o = SubmitOptions {
            request_status_report: true,
            validity: Some(Duration::from_secs(24 * 3600)),
            ..opts(1)
        };
        let p = &encode_submit(&dest(), "hi", &o).unwrap()[0];
        // FO 0x31 = SUBMIT | VPF relative | SRR; VP 0xA7 = 24 h.
        assert_eq!(p.hex, "0031000D91683108108300F00000A702E834");
        let d = decode_submit(&p.hex).unwrap();
        assert!(d.status_report);
        assert_eq!(d.text, "hi");
    }

    #[test]
    fn validity_period_encoding() {
        let m = |mins: u64| relative_validity(Duration::from_secs(mins * 60));
        assert_eq!(m(0), 0);
        assert_eq!(m(5), 0);
        assert_eq!(m(6), 1);
        assert_eq!(m(12 * 60), 143);
        assert_eq!(m(12 * 60 + 1), 144);
        assert_eq!(m(24 * 60), 167);
        assert_eq!(m(2 * 24 * 60), 168);
        assert_eq!(m(30 * 24 * 60), 196);
        assert_eq!(m(31 * 24 * 60), 197);
        assert_eq!(m(63 * 7 * 24 * 60), 255);
        assert_eq!(m(100 * 7 * 24 * 60), 255);
        for vp in 0..=255u8 {
            assert_eq!(
                relative_validity(relative_validity_duration(vp)),
                vp,
                "vp {vp}"
            );
        }
    }

    #[test]
    fn alphabet_choice_and_extension_cost() {
        assert!(
            "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./09:;<=>?¡AZÄÖÑÜ§¿azäöñüà"
                .chars()
                .all(is_gsm7)
        );
        assert!(!is_gsm7('\u{1B}'));
        assert!(!is_gsm7('`'));
        assert!(!is_gsm7('中'));
        assert!(!is_gsm7('…'));
        for c in "€[]{}^~\\|".chars() {
            let m = measure(&c.to_string());
            assert_eq!((m.alphabet, m.units), (Alphabet::Gsm7, 2), "{c}");
        }
        let m = measure("a€b");
        assert_eq!((m.alphabet, m.units, m.parts), (Alphabet::Gsm7, 4, 1));
        let m = measure("a中");
        assert_eq!((m.alphabet, m.units), (Alphabet::Ucs2, 2));
        let m = measure("😀");
        assert_eq!((m.alphabet, m.units), (Alphabet::Ucs2, 2));
        assert_eq!(
            measure(""),
            Measure {
                alphabet: Alphabet::Gsm7,
                units: 0,
                parts: 1
            }
        );
    }

    #[test]
    fn part_boundaries() {
        assert_eq!(measure(&"a".repeat(160)).parts, 1);
        assert_eq!(measure(&"a".repeat(161)).parts, 2);
        assert_eq!(measure(&"a".repeat(306)).parts, 2);
        assert_eq!(measure(&"a".repeat(307)).parts, 3);
        assert_eq!(measure(&"€".repeat(80)).parts, 1);
        assert_eq!(measure(&"€".repeat(81)).parts, 2);
        assert_eq!(measure(&"中".repeat(70)).parts, 1);
        assert_eq!(measure(&"中".repeat(71)).parts, 2);
        assert_eq!(measure(&"中".repeat(134)).parts, 2);
        assert_eq!(measure(&"中".repeat(135)).parts, 3);
        assert_eq!(capacity(Alphabet::Gsm7, 1), 160);
        assert_eq!(capacity(Alphabet::Gsm7, 3), 459);
        assert_eq!(capacity(Alphabet::Ucs2, 1), 70);
        assert_eq!(capacity(Alphabet::Ucs2, 2), 134);
        assert_eq!(capacity(Alphabet::Ucs2, 0), 0);
        for n in [1u8, 2, 4] {
            let t = "x".repeat(capacity(Alphabet::Gsm7, n));
            assert_eq!(measure(&t).parts, usize::from(n));
            assert_eq!(measure(&format!("{t}x")).parts, usize::from(n) + 1);
        }
    }

    #[test]
    fn single_part_sizes_are_full() {
        let p = &encode_submit(&dest(), &"a".repeat(160), &opts(1)).unwrap()[0];
        assert_eq!(p.tpdu_len, 1 + 1 + 9 + 1 + 1 + 1 + 140);
        let p = &encode_submit(&dest(), &"中".repeat(70), &opts(1)).unwrap()[0];
        assert_eq!(p.tpdu_len, 1 + 1 + 9 + 1 + 1 + 1 + 140);
        assert_eq!(
            encode_submit(&dest(), &"a".repeat(161), &opts(1)),
            Err(PduError::TooLong { needed: 2, max: 1 })
        );
        assert_eq!(
            encode_submit(&dest(), &"中".repeat(71), &opts(1)),
            Err(PduError::TooLong { needed: 2, max: 1 })
        );
        assert_eq!(encode_submit(&dest(), "", &opts(1)), Err(PduError::Empty));
        assert_eq!(
            encode_submit(&dest(), "a", &opts(0)),
            Err(PduError::ZeroMaxParts)
        );
    }

    fn roundtrip_parts(text: &str, max_parts: u8) -> Vec<DecodedSubmit> {
        let pdus = encode_submit(&dest(), text, &opts(max_parts)).unwrap();
        let decoded: Vec<_> = pdus
            .iter()
            .map(|p| {
                assert_eq!(p.tpdu_len * 2 + 2, p.hex.len());
                assert!(p.tpdu_len <= 164);
                assert_eq!(p.hex, p.hex.to_uppercase());
                decode_submit(&p.hex).unwrap()
            })
            .collect();
        let n = u8::try_from(pdus.len()).unwrap();
        for (i, (p, d)) in pdus.iter().zip(&decoded).enumerate() {
            let seq = u8::try_from(i + 1).unwrap();
            assert_eq!((p.part, p.parts), (seq, n));
            assert_eq!(d.destination, "+8613800138000");
            if n == 1 {
                assert_eq!(d.concat, None);
            } else {
                assert_eq!(d.concat, Some((0x42, n, seq)));
            }
        }
        let joined: String = decoded.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(joined, text);
        assert_eq!(decoded.len(), measure(text).parts);
        decoded
    }

    #[test]
    fn roundtrip_gsm7() {
        let text = "@£$¥ Hello {world} [ok] ~^|\\ €5 Ça va? ñ ü ß\n\r\u{0C}end";
        let d = roundtrip_parts(text, 1);
        assert_eq!(d[0].alphabet, Alphabet::Gsm7);
        // 7 septets in 8n-1 position: the last septet must not decode as a trailing '@'.
        roundtrip_parts("1234567", 1);
        roundtrip_parts("@", 1);
    }

    #[test]
    fn roundtrip_ucs2_chinese() {
        let d = roundtrip_parts("新邮件 alice@example.com：来自 张三，主题：你好😀", 1);
        assert_eq!(d[0].alphabet, Alphabet::Ucs2);
        let p = &encode_submit(&dest(), "你好", &opts(1)).unwrap()[0];
        assert_eq!(p.hex, "0001000D91683108108300F00008044F60597D");
    }

    #[test]
    fn roundtrip_multipart() {
        let gsm: String = (0..400)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let d = roundtrip_parts(&gsm, 3);
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].text.len(), 153);
        assert_eq!(d[1].text.len(), 153);
        let zh = "中文长短信测试，".repeat(20);
        let d = roundtrip_parts(&zh, 4);
        assert_eq!(d.len(), 3);
        assert!(d.iter().all(|d| d.alphabet == Alphabet::Ucs2));
        assert_eq!(d[0].text.chars().count(), 67);
        assert_eq!(
            encode_submit(&dest(), &zh, &opts(2)),
            Err(PduError::TooLong { needed: 3, max: 2 })
        );
        // Multipart UDH on the wire: UDHI set, UDL 160 septets, header 050003 ref total seq.
        let pdus = encode_submit(&dest(), &gsm, &opts(3)).unwrap();
        assert!(
            pdus[0]
                .hex
                .starts_with("0041000D91683108108300F00000A0050003420301"),
            "{}",
            pdus[0].hex
        );
        assert_eq!(pdus[0].tpdu_len, 1 + 1 + 9 + 1 + 1 + 1 + 140);
    }

    #[test]
    fn escape_pair_never_split() {
        let text = format!("{}€{}", "a".repeat(152), "b".repeat(10));
        assert_eq!(measure(&text).units, 164);
        let d = roundtrip_parts(&text, 2);
        assert_eq!(d[0].text, "a".repeat(152));
        assert_eq!(d[1].text, format!("€{}", "b".repeat(10)));
        // Exactly filling a part with an escape pair at its end is fine.
        let text = format!("{}€{}", "a".repeat(151), "b".repeat(10));
        let d = roundtrip_parts(&text, 2);
        assert_eq!(d[0].text, format!("{}€", "a".repeat(151)));
    }

    #[test]
    fn surrogate_pair_never_split() {
        let text = format!("{}😀{}", "中".repeat(66), "文".repeat(10));
        assert_eq!(measure(&text).units, 78);
        let d = roundtrip_parts(&text, 2);
        assert_eq!(d[0].text, "中".repeat(66));
        assert_eq!(d[1].text, format!("😀{}", "文".repeat(10)));
        // 68 units with the emoji last still fits a single part.
        let text = format!("{}😀", "中".repeat(66));
        assert_eq!(roundtrip_parts(&text, 1).len(), 1);
        let text = format!("{}😀", "中".repeat(69));
        assert_eq!(measure(&text).parts, 2);
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let mut samples = Vec::new();
        for (text, o) in [
            ("hellohello", opts(1)),
            ("你好😀", opts(1)),
            (&*"long message ".repeat(20), opts(2)),
            (&*"长".repeat(80), opts(2)),
        ] {
            samples.extend(encode_submit(&dest(), text, &o).unwrap());
        }
        samples.extend(
            encode_submit(
                &dest(),
                "vp",
                &SubmitOptions {
                    validity: Some(Duration::from_secs(3600)),
                    ..opts(1)
                },
            )
            .unwrap(),
        );
        for p in &samples {
            assert!(decode_submit(&p.hex).is_ok());
            for cut in 0..p.hex.len() {
                let r = decode_submit(&p.hex[..cut]);
                assert!(r.is_err(), "prefix {cut} of {} decoded: {r:?}", p.hex);
                if cut % 2 == 1 {
                    assert_eq!(r, Err(PduError::OddHexLength));
                } else {
                    assert!(
                        matches!(r, Err(PduError::Truncated { .. })),
                        "cut {cut}: {r:?}"
                    );
                }
            }
            let extra = format!("{}00", p.hex);
            assert_eq!(
                decode_submit(&extra),
                Err(PduError::TrailingData { extra: 1 })
            );
        }
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        assert_eq!(decode_submit("zz"), Err(PduError::InvalidHex { offset: 0 }));
        assert_eq!(
            decode_submit("00G1"),
            Err(PduError::InvalidHex { offset: 2 })
        );
        assert_eq!(
            decode_submit(""),
            Err(PduError::Truncated {
                field: "service centre address"
            })
        );
        assert_eq!(decode_submit("0004"), Err(PduError::NotSubmit { mti: 0 }));
        assert!(matches!(
            decode_submit(&"00".repeat(MAX_PDU_OCTETS + 1)),
            Err(PduError::TooLarge { .. })
        ));
        // 8-bit DCS.
        assert_eq!(
            decode_submit("0001000D91683108108300F0000401FF"),
            Err(PduError::UnsupportedDcs(0x04))
        );
        // UCS-2 with an unpaired high surrogate.
        assert!(matches!(
            decode_submit("0001000D91683108108300F0000802D83D"),
            Err(PduError::InvalidUserData(_))
        ));
        // UDH length pointing past the user data.
        assert!(matches!(
            decode_submit("0041000D91683108108300F00008030900FF"),
            Err(PduError::InvalidUdh(_))
        ));
        // Concatenation sequence 0.
        assert!(matches!(
            decode_submit("0041000D91683108108300F0000806050003420200"),
            Err(PduError::InvalidUdh(_))
        ));

        // Every single-byte corruption and a deterministic pseudo-random sweep.
        let base = &encode_submit(&dest(), &"長い text € ".repeat(12), &opts(3)).unwrap();
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for p in base {
            let bytes = hex::decode(&p.hex).unwrap();
            for i in 0..bytes.len() {
                for v in [0x00, 0xFF, bytes[i] ^ 0x01, bytes[i] ^ 0x80] {
                    let mut b = bytes.clone();
                    b[i] = v;
                    let _ = decode_submit(&hex::encode(&b));
                }
            }
        }
        for _ in 0..20_000 {
            let len = (next() % 180) as usize;
            let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_submit(&hex::encode(&b));
            // Also with a plausible header so the deeper fields get exercised.
            let mut h = hex::decode("0041000D91683108108300F000").unwrap();
            h.extend(b.iter().take(150));
            let _ = decode_submit(&hex::encode(&h));
        }
    }

    #[test]
    fn decode_accepts_real_sca_and_lowercase() {
        // Same SUBMIT with an explicit SMSC (+8613800100500) in front, lowercase, with CRLF.
        let d =
            decode_submit("0891683108100005F001000D91683108108300F000000ae8329bfd4697d9ec37\r\n")
                .unwrap();
        assert_eq!(d.text, "hellohello");
        assert_eq!(d.destination, "+8613800138000");
    }
}
