//! Listener addresses: one address per (network, alias), taken from a range
//! and kept stable. The first choice is a hash of `<alias>.<network>`, so an
//! alias gets the same address after a restart; a collision probes the next
//! free address, and an alias keeps its address for as long as it exists.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::settings::{host_count, ProxyBind};

/// Assigns listener addresses for one side (loopback or containers).
#[derive(Debug, Clone)]
pub struct AddressBook {
    bind: ProxyBind,
    assigned: BTreeMap<(String, String), IpAddr>,
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn nth_host(net: &IpNet, index: u128) -> IpAddr {
    match net {
        IpNet::V4(v4) => {
            let bits = 32 - v4.prefix_len();
            // Skip the network address of ranges with a broadcast address.
            let skip = u32::from(bits >= 2);
            let base = u32::from(v4.network());
            IpAddr::from((base + skip + index as u32).to_be_bytes())
        }
        IpNet::V6(v6) => {
            let base = u128::from(v6.network());
            IpAddr::from((base + index).to_be_bytes())
        }
    }
}

impl AddressBook {
    pub fn new(bind: ProxyBind) -> Self {
        Self {
            bind,
            assigned: BTreeMap::new(),
        }
    }

    /// Keeps the addresses of aliases still present, forgets the others, and
    /// assigns new ones. An alias left without one (the range is full) has
    /// no listener on this side.
    pub fn update(&mut self, aliases: &[(String, String)]) {
        let wanted: HashSet<&(String, String)> = aliases.iter().collect();
        self.assigned.retain(|k, _| wanted.contains(k));
        let ProxyBind::Range(net) = self.bind else {
            return;
        };
        let count = host_count(&net);
        let mut used: HashSet<IpAddr> = self.assigned.values().copied().collect();
        for key in aliases {
            if self.assigned.contains_key(key) {
                continue;
            }
            let start = u128::from(fnv1a(&format!("{}.{}", key.1, key.0))) % count;
            let free = (0..count.min(1 << 20))
                .map(|i| nth_host(&net, (start + i) % count))
                .find(|ip| !used.contains(ip));
            if let Some(ip) = free {
                used.insert(ip);
                self.assigned.insert(key.clone(), ip);
            }
        }
    }

    pub fn bind(&self) -> &ProxyBind {
        &self.bind
    }

    /// The address of `alias` in `network`, once assigned.
    pub fn get(&self, network: &str, alias: &str) -> Option<IpAddr> {
        match self.bind {
            ProxyBind::Single(ip) => Some(ip),
            ProxyBind::Range(_) => self
                .assigned
                .get(&(network.to_owned(), alias.to_owned()))
                .copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(network: &str, alias: &str) -> (String, String) {
        (network.to_owned(), alias.to_owned())
    }

    #[test]
    fn addresses_are_distinct_stable_and_in_range() {
        let range: IpNet = "127.77.0.0/16".parse().unwrap();
        let mut book = AddressBook::new(ProxyBind::Range(range));
        let aliases = vec![key("dev", "api"), key("dev", "db"), key("prod", "api")];
        book.update(&aliases);
        let api = book.get("dev", "api").unwrap();
        let db = book.get("dev", "db").unwrap();
        let prod = book.get("prod", "api").unwrap();
        assert!(api != db && db != prod && api != prod);
        for ip in [api, db, prod] {
            assert!(range.contains(&ip), "{ip}");
            assert_ne!(ip, "127.77.0.0".parse::<IpAddr>().unwrap());
        }
        // A fresh book (a restart) gives the same addresses.
        let mut again = AddressBook::new(ProxyBind::Range(range));
        again.update(&aliases);
        assert_eq!(again.get("dev", "api"), Some(api));
        // Removing one alias keeps the others; it is forgotten.
        book.update(&[key("dev", "api"), key("prod", "api")]);
        assert_eq!(book.get("dev", "api"), Some(api));
        assert_eq!(book.get("dev", "db"), None);
    }

    #[test]
    fn collisions_probe_and_a_full_range_assigns_nothing_more() {
        // A /30 has two usable addresses.
        let mut book = AddressBook::new(ProxyBind::Range("127.0.1.0/30".parse().unwrap()));
        book.update(&[key("a", "x"), key("a", "y"), key("a", "z")]);
        let got: HashSet<_> = ["x", "y", "z"]
            .iter()
            .filter_map(|a| book.get("a", a))
            .collect();
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|ip| ip.to_string() == "127.0.1.1" || ip.to_string() == "127.0.1.2"));
    }

    #[test]
    fn single_address_serves_everything() {
        let ip: IpAddr = "127.0.0.5".parse().unwrap();
        let mut book = AddressBook::new(ProxyBind::Single(ip));
        book.update(&[key("dev", "api")]);
        assert_eq!(book.get("dev", "api"), Some(ip));
    }
}
