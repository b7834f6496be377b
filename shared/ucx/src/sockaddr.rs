//! Conversions between `std::net::SocketAddr` and the C socket addresses UCX takes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use ucx_rs::sys;

/// A C socket address with its length, ready to lend to UCX for the duration of a call.
pub(crate) struct RawSockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawSockAddr {
    pub fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain old data for which all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is large and aligned enough for any socket address.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: as above.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        RawSockAddr { storage, len: len as libc::socklen_t }
    }

    /// The address as UCX wants it; valid while `self` is.
    pub fn as_ucs(&self) -> sys::ucs_sock_addr_t {
        sys::ucs_sock_addr_t { addr: &self.storage as *const _ as *const sys::sockaddr, addrlen: self.len }
    }
}

/// Reads an IPv4 or IPv6 address out of a C `sockaddr_storage`.
pub(crate) fn from_storage(storage: &sys::sockaddr_storage) -> Option<SocketAddr> {
    let raw = storage as *const sys::sockaddr_storage;
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, which it is large and
            // aligned enough for.
            let sin = unsafe { &*(raw as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(raw as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), sin6.sin6_flowinfo, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        for addr in ["127.0.0.1:4242", "[::1]:4343"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let raw = RawSockAddr::new(addr);
            // SAFETY: both are 128-byte socket address storages with the same layout.
            let storage = unsafe { &*(&raw.storage as *const _ as *const sys::sockaddr_storage) };
            assert_eq!(from_storage(storage), Some(addr));
        }
    }
}
