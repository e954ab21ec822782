//! The smoltcp device of a node: two queues of inner IP packets. Decrypted
//! packets wait in `rx` for the stack; packets the stack emits wait in `tx`
//! for encryption. Both are bounded.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// The inner MTU: WireGuard's usual 1420 (1500 minus the outer IPv6, UDP and
/// WireGuard headers).
pub const MTU: usize = 1420;

/// At most this many packets wait in each direction.
pub(crate) const QUEUE_LIMIT: usize = 4096;

#[derive(Default)]
pub(crate) struct IpQueue {
    pub(crate) rx: VecDeque<Vec<u8>>,
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// Spare buffers, so the data path does not allocate per packet.
    spare: Vec<Vec<u8>>,
}

impl IpQueue {
    /// A buffer of exactly `len` bytes (contents unspecified), reusing a
    /// spare one: only bytes it never had are zeroed.
    pub(crate) fn buffer(&mut self, len: usize) -> Vec<u8> {
        sized(self.spare.pop().unwrap_or_default(), len)
    }

    pub(crate) fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < 256 && buf.capacity() >= MTU {
            self.spare.push(buf);
        }
    }
}

fn sized(mut buf: Vec<u8>, len: usize) -> Vec<u8> {
    if buf.len() < len {
        buf.resize(len, 0);
    } else {
        buf.truncate(len);
    }
    buf
}

pub(crate) struct RxToken(Vec<u8>);

pub(crate) struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    spare: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = sized(self.spare.pop().unwrap_or_default(), len);
        let result = f(&mut buf);
        self.tx.push_back(buf);
        result
    }
}

impl phy::Device for IpQueue {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((
            RxToken(packet),
            TxToken {
                tx: &mut self.tx,
                spare: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if self.tx.len() >= QUEUE_LIMIT {
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            spare: &mut self.spare,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // WireGuard's AEAD already authenticated every inner packet: compute
        // checksums for the peer, skip verifying them on receive.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
