//! PROXY protocol version 2 header, as the proxy writes it to the backend before any other byte,
//! so the backend (Stalwart `proxy.trusted-networks`, Dovecot `haproxy_trusted_networks`) sees
//! the real client address.
//!
//! ```text
//! signature  12 bytes  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A   ("\r\n\r\n\0\r\nQUIT\n")
//! ver_cmd    1 byte    0x21 = version 2, PROXY   |  0x20 = version 2, LOCAL
//! fam_proto  1 byte    0x11 = TCP over IPv4  |  0x21 = TCP over IPv6  |  0x00 = UNSPEC (LOCAL)
//! len        u16be     bytes that follow: addresses + TLVs
//! IPv4       src_addr:4  dst_addr:4  src_port:u16be  dst_port:u16be               (12 bytes)
//! IPv6       src_addr:16 dst_addr:16 src_port:u16be  dst_port:u16be               (36 bytes)
//! TLV        type:u8  length:u16be  value
//!   0x02 PP2_TYPE_AUTHORITY  the host name the client asked for (TLS SNI), UTF-8
//!   0x20 PP2_TYPE_SSL        client:u8 (0x01 PP2_CLIENT_SSL)  verify:u32be (0 = no client
//!                            certificate problem)  sub-TLVs:
//!        0x21 PP2_SUBTYPE_SSL_VERSION  "TLSv1.3", US-ASCII
//! ```
//!
//! A source and a destination of different families (one IPv4, one IPv6) are both sent as IPv6,
//! the IPv4 one as an IPv4-mapped address (`::ffff:a.b.c.d`).

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// PP2_TYPE_AUTHORITY.
pub const TYPE_AUTHORITY: u8 = 0x02;
/// PP2_TYPE_SSL.
pub const TYPE_SSL: u8 = 0x20;
/// PP2_SUBTYPE_SSL_VERSION.
pub const SUBTYPE_SSL_VERSION: u8 = 0x21;
/// PP2_CLIENT_SSL: the client connected over TLS.
pub const CLIENT_SSL: u8 = 0x01;
/// Longest TLV value this encoder writes (a DNS name is at most 253 bytes).
pub const MAX_TLV_VALUE: usize = 255;

/// What the header says about the client's connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// The connection is the proxy's own (a health check): the backend uses the real peer
    /// address.
    Local,
    /// A proxied TCP connection.
    Proxy {
        /// The client's address and port.
        source: SocketAddr,
        /// The address and port the client connected to (the proxy's listener).
        destination: SocketAddr,
        /// Set when the client reached the proxy over TLS.
        tls: Option<TlsInfo>,
    },
}

/// TLS facts passed to the backend in TLVs.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TlsInfo {
    /// The TLS version as text, such as `TLSv1.3` (PP2_SUBTYPE_SSL_VERSION).
    pub version: Option<String>,
    /// The server name the client sent (SNI), sent as PP2_TYPE_AUTHORITY.
    pub sni: Option<String>,
}

/// A header that cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyV2Error {
    #[error("{field} of {len} bytes exceeds the maximum of {MAX_TLV_VALUE}")]
    TlvTooLong { field: &'static str, len: usize },
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    // Callers bound every value far below u16::MAX.
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn checked<'a>(field: &'static str, value: &'a str) -> Result<&'a [u8], ProxyV2Error> {
    if value.len() > MAX_TLV_VALUE {
        return Err(ProxyV2Error::TlvTooLong {
            field,
            len: value.len(),
        });
    }
    Ok(value.as_bytes())
}

impl Header {
    /// Appends the encoded header to `out`; nothing is appended on error.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProxyV2Error> {
        let Header::Proxy {
            source,
            destination,
            tls,
        } = self
        else {
            out.extend_from_slice(&SIGNATURE);
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            return Ok(());
        };
        let mut body = Vec::with_capacity(64);
        let family = match (source.ip(), destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                body.extend_from_slice(&s.octets());
                body.extend_from_slice(&d.octets());
                0x11
            }
            (s, d) => {
                body.extend_from_slice(&v6(s));
                body.extend_from_slice(&v6(d));
                0x21
            }
        };
        body.extend_from_slice(&source.port().to_be_bytes());
        body.extend_from_slice(&destination.port().to_be_bytes());
        if let Some(tls) = tls {
            if let Some(sni) = &tls.sni {
                tlv(&mut body, TYPE_AUTHORITY, checked("sni", sni)?);
            }
            let mut ssl = vec![CLIENT_SSL, 0, 0, 0, 0];
            if let Some(version) = &tls.version {
                tlv(
                    &mut ssl,
                    SUBTYPE_SSL_VERSION,
                    checked("tls version", version)?,
                );
            }
            tlv(&mut body, TYPE_SSL, &ssl);
        }
        out.extend_from_slice(&SIGNATURE);
        out.push(0x21);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(())
    }

    /// The encoded header as a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProxyV2Error> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig() -> Vec<u8> {
        vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
        ]
    }

    #[test]
    fn signature_is_the_specified_bytes() {
        assert_eq!(SIGNATURE.to_vec(), sig());
    }

    #[test]
    fn local_command_has_no_addresses() {
        let mut want = sig();
        want.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(Header::Local.to_bytes().unwrap(), want);
    }

    #[test]
    fn tcp4_layout() {
        let h = Header::Proxy {
            source: "203.0.113.7:40000".parse().unwrap(),
            destination: "192.0.2.1:995".parse().unwrap(),
            tls: None,
        };
        let mut want = sig();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1]);
        want.extend_from_slice(&[0x9C, 0x40, 0x03, 0xE3]);
        assert_eq!(h.to_bytes().unwrap(), want);
    }

    #[test]
    fn tcp6_layout() {
        let h = Header::Proxy {
            source: "[2001:db8::7]:1024".parse().unwrap(),
            destination: "[2001:db8::1]:143".parse().unwrap(),
            tls: None,
        };
        let bytes = h.to_bytes().unwrap();
        assert_eq!(&bytes[12..16], &[0x21, 0x21, 0x00, 36]);
        assert_eq!(bytes.len(), 16 + 36);
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        src[15] = 7;
        assert_eq!(&bytes[16..32], &src);
        assert_eq!(bytes[47], 1);
        assert_eq!(&bytes[48..52], &[0x04, 0x00, 0x00, 0x8F]);
    }

    #[test]
    fn mixed_families_are_sent_as_ipv4_mapped_ipv6() {
        let h = Header::Proxy {
            source: "198.51.100.9:5000".parse().unwrap(),
            destination: "[::1]:110".parse().unwrap(),
            tls: None,
        };
        let bytes = h.to_bytes().unwrap();
        assert_eq!(bytes[13], 0x21);
        assert_eq!(
            &bytes[16..32],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 9]
        );
    }

    #[test]
    fn tls_tlvs_follow_the_addresses() {
        let h = Header::Proxy {
            source: "203.0.113.7:40000".parse().unwrap(),
            destination: "192.0.2.1:993".parse().unwrap(),
            tls: Some(TlsInfo {
                version: Some("TLSv1.3".into()),
                sni: Some("mail.example".into()),
            }),
        };
        let bytes = h.to_bytes().unwrap();
        let mut tlvs = vec![0x02, 0x00, 12];
        tlvs.extend_from_slice(b"mail.example");
        tlvs.extend_from_slice(&[0x20, 0x00, 15, 0x01, 0, 0, 0, 0, 0x21, 0x00, 7]);
        tlvs.extend_from_slice(b"TLSv1.3");
        assert_eq!(&bytes[28..], &tlvs[..]);
        let len = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        assert_eq!(len, 12 + tlvs.len());
        assert_eq!(bytes.len(), 16 + len);
    }

    #[test]
    fn overlong_sni_is_refused_and_nothing_written() {
        let h = Header::Proxy {
            source: "203.0.113.7:1".parse().unwrap(),
            destination: "192.0.2.1:2".parse().unwrap(),
            tls: Some(TlsInfo {
                version: None,
                sni: Some("a".repeat(300)),
            }),
        };
        let mut out = vec![1];
        assert_eq!(
            h.encode(&mut out),
            Err(ProxyV2Error::TlvTooLong {
                field: "sni",
                len: 300
            })
        );
        assert_eq!(out, vec![1]);
    }
}
