//! QUIC peer addresses: `quic://host:port`, with a certificate pin or a server name.

use super::*;

/// A receiver's address: `[quic://]host:port[#key=value[&key=value]]`, IPv6 hosts bracketed
/// (`quic://[::1]:4433`). Keys: `sha256` pins the receiver's certificate (64 hex digits, colons
/// allowed); `sni` names the host the certificate is validated for against a CA (default: the
/// host part). Any other key is an error, so a mistyped pin cannot silently go unchecked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicPeer {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) pin: Option<[u8; 32]>,
    pub(super) server_name: Option<String>,
}

impl QuicPeer {
    pub fn parse(s: &str) -> Result<Self, TransferError> {
        let bad = |reason: String| TransferError::Connect { peer: s.to_string(), reason };
        let rest = s.strip_prefix(SCHEME).unwrap_or(s);
        let (authority, fragment) = match rest.split_once('#') {
            Some((a, f)) => (a, Some(f)),
            None => (rest, None),
        };
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("expected host:port".into()))?;
        let port: u16 = port.parse().map_err(|_| bad(format!("bad port {port:?}")))?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']').ok_or_else(|| bad("unclosed [ in host".into()))?,
            None => host,
        };
        if host.is_empty() || (host.contains(':') && host.parse::<IpAddr>().is_err()) {
            return Err(bad(format!("bad host {host:?}")));
        }
        let mut peer = QuicPeer { host: host.to_string(), port, pin: None, server_name: None };
        for pair in fragment.into_iter().flat_map(|f| f.split('&')).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sha256", v)) => {
                    let pin = parse_fingerprint(v).ok_or_else(|| bad("sha256 pin must be 64 hex digits".into()))?;
                    peer.pin = Some(pin);
                }
                Some(("sni", v)) if !v.is_empty() => peer.server_name = Some(v.to_string()),
                // An unknown key could be a mistyped pin: refuse rather than connect without it.
                _ => return Err(bad(format!("unknown address parameter {pair:?}"))),
            }
        }
        Ok(peer)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pinned certificate fingerprint (lower-case hex), if any.
    pub fn fingerprint(&self) -> Option<String> {
        self.pin.map(|p| to_hex(&p))
    }

    /// The name the certificate is validated against.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.host)
    }
}

impl fmt::Display for QuicPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{SCHEME}[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{SCHEME}{}:{}", self.host, self.port)?;
        }
        let mut sep = '#';
        if let Some(pin) = &self.pin {
            write!(f, "{sep}sha256={}", to_hex(pin))?;
            sep = '&';
        }
        if let Some(name) = &self.server_name {
            write!(f, "{sep}sni={name}")?;
        }
        Ok(())
    }
}

impl FromStr for QuicPeer {
    type Err = TransferError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}
