//! The container side's per-alias addresses: one `local` route for the
//! whole container proxy range on the interface that holds the container
//! address (the sandbox bridge), so that every address of the range is this
//! host's (Linux "AnyIP") without adding one address per alias. Containers
//! reach them through their default gateway, which is that bridge; their
//! own source address is kept, which is how the listener identifies them.
//!
//! Equivalent to `ip route replace local <range> dev <bridge> table local`,
//! sent as one rtnetlink message (no shell, no `ip` binary). It needs
//! CAP_NET_ADMIN, which the agent has on a host; without it the caller
//! falls back to the container address alone.

use std::io::{self, Read};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::Ipv4Net;
use socket2::{Domain, Protocol, Socket, Type};

const NETLINK_ROUTE: i32 = 0;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = 2;
const RT_TABLE_LOCAL: u8 = 255;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;

/// The name and index of the interface that holds `addr`.
pub fn interface_of(addr: IpAddr) -> io::Result<(String, u32)> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    for entry in addrs {
        let ip = entry.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if ip == Some(addr) {
            let index = nix::net::if_::if_nametoindex(entry.interface_name.as_str())
                .map_err(io::Error::from)?;
            return Ok((entry.interface_name, index));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no interface holds {addr}"),
    ))
}

/// The RTM_NEWROUTE request (create or replace, with an acknowledgement).
fn route_request(range: Ipv4Net, ifindex: u32, seq: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(28);
    // struct rtmsg
    body.extend_from_slice(&[
        AF_INET,
        range.prefix_len(),
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_STATIC,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ]);
    body.extend_from_slice(&0u32.to_ne_bytes());
    // RTA_DST
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&RTA_DST.to_ne_bytes());
    body.extend_from_slice(&range.network().octets());
    // RTA_OIF
    body.extend_from_slice(&8u16.to_ne_bytes());
    body.extend_from_slice(&RTA_OIF.to_ne_bytes());
    body.extend_from_slice(&ifindex.to_ne_bytes());
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
    msg.extend_from_slice(
        &(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).to_ne_bytes(),
    );
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

/// The errno of the acknowledgement to `seq` (0 = done).
fn parse_ack(reply: &[u8], seq: u32) -> io::Result<i32> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {why}"));
    if reply.len() < 20 {
        return Err(bad("short reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let got_seq = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
    if kind != NLMSG_ERROR || got_seq != seq {
        return Err(bad("unexpected reply"));
    }
    Ok(-i32::from_ne_bytes([
        reply[16], reply[17], reply[18], reply[19],
    ]))
}

/// Makes every address of `range` local to this host on `ifindex`.
pub fn ensure_local_route(range: Ipv4Net, ifindex: u32) -> io::Result<()> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_ROUTE)),
    )?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let seq = 1;
    socket.send(&route_request(range, ifindex, seq))?;
    let mut reply = [0u8; 1024];
    let n = (&socket).read(&mut reply)?;
    match parse_ack(&reply[..n], seq)? {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let msg = route_request("100.127.77.0/24".parse().unwrap(), 7, 9);
        assert_eq!(msg.len(), 16 + 12 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWROUTE);
        // rtmsg: family, prefix, table, scope, type.
        assert_eq!(
            (msg[16], msg[17], msg[20], msg[22], msg[23]),
            (2, 24, 255, 254, 2)
        );
        assert_eq!(&msg[32..36], &[100, 127, 77, 0]);
        assert_eq!(u32::from_ne_bytes(msg[40..44].try_into().unwrap()), 7);
    }

    #[test]
    fn ack_errno_is_read() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[8..12].copy_from_slice(&9u32.to_ne_bytes());
        reply[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse_ack(&reply, 9).unwrap(), 1);
        assert!(parse_ack(&reply, 8).is_err());
        assert!(parse_ack(&reply[..10], 9).is_err());
    }

    #[test]
    fn the_loopback_interface_is_found() {
        let (name, index) = interface_of("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(name, "lo");
        assert!(index > 0);
    }
}
