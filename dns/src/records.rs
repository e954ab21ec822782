//! The live record table: `<alias>.<network>.gstacks` -> the addresses of the
//! local proxy listener for that alias.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock,
    },
};

use hickory_proto::rr::{LowerName, Name};

use crate::DnsError;

/// The zone the agent answers for itself; every other name is forwarded.
pub const DNS_SUFFIX: &str = "gstacks";

/// Where the local proxy listener of one alias listens: an IPv4 address, an
/// IPv6 address, or both. A query for a type the listener has no address of
/// gets an empty NOERROR answer (NODATA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerAddrs {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl ListenerAddrs {
    /// A listener on an IPv4 address only (A answers, AAAA is NODATA).
    pub fn v4(ipv4: Ipv4Addr) -> Self {
        ListenerAddrs {
            ipv4: Some(ipv4),
            ipv6: None,
        }
    }

    /// A listener on an IPv6 address only (AAAA answers, A is NODATA).
    pub fn v6(ipv6: Ipv6Addr) -> Self {
        ListenerAddrs {
            ipv4: None,
            ipv6: Some(ipv6),
        }
    }

    pub fn with_ipv6(self, ipv6: Ipv6Addr) -> Self {
        ListenerAddrs {
            ipv6: Some(ipv6),
            ..self
        }
    }
}

impl fmt::Display for ListenerAddrs {
    /// `127.77.0.1`, `fd00::1`, or `127.77.0.1, fd00::1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.ipv4, self.ipv6) {
            (Some(v4), Some(v6)) => write!(f, "{v4}, {v6}"),
            (Some(v4), None) => write!(f, "{v4}"),
            (None, Some(v6)) => write!(f, "{v6}"),
            (None, None) => f.write_str("no address"),
        }
    }
}

/// What the table knows about one queried name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NameState {
    /// `<alias>.<network>.gstacks`
    Alias(ListenerAddrs),
    /// `gstacks` itself or `<network>.gstacks` of a network with aliases:
    /// the name exists but holds no address (RFC 8020: not NXDOMAIN).
    Interior,
    /// Under `.gstacks` and unknown.
    Unknown,
}

/// One immutable generation of records, built from a netmap and then swapped
/// into [`Records`] whole.
#[derive(Clone)]
pub struct RecordTable {
    aliases: HashMap<LowerName, ListenerAddrs>,
    /// The same records keyed by their lower-case wire form
    /// (`\x03api\x03dev\x07gstacks\x00`), for the UDP fast path.
    wire: HashMap<Box<[u8]>, ListenerAddrs>,
    interior: HashSet<LowerName>,
    apex: LowerName,
    serial: u32,
}

impl Default for RecordTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RecordTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<_> = self.entries().collect();
        entries.sort();
        f.debug_struct("RecordTable")
            .field("serial", &self.serial)
            .field("entries", &entries)
            .finish()
    }
}

impl RecordTable {
    pub fn new() -> Self {
        let apex = LowerName::new(&apex_name());
        let mut interior = HashSet::new();
        interior.insert(apex.clone());
        RecordTable {
            aliases: HashMap::new(),
            wire: HashMap::new(),
            interior,
            apex,
            serial: 0,
        }
    }

    /// Adds `<alias>.<network>.gstacks`. Both must be DNS labels (letters,
    /// digits and inner hyphens, at most 63); case does not matter.
    pub fn insert(
        &mut self,
        network: &str,
        alias: &str,
        addrs: ListenerAddrs,
    ) -> Result<(), DnsError> {
        validate_label("network", network)?;
        validate_label("alias", alias)?;
        let text = format!("{alias}.{network}.{DNS_SUFFIX}.").to_ascii_lowercase();
        let name = Name::from_str(&text).map_err(|_| DnsError::InvalidLabel {
            kind: "alias",
            label: alias.to_string(),
            reason: "does not form a DNS name",
        })?;
        let name = LowerName::new(&name);
        if self.aliases.contains_key(&name) {
            return Err(DnsError::DuplicateRecord {
                name: text.trim_end_matches('.').to_string(),
            });
        }
        if addrs.ipv4.is_none() && addrs.ipv6.is_none() {
            return Err(DnsError::NoAddress {
                name: text.trim_end_matches('.').to_string(),
            });
        }
        let mut wire = Vec::with_capacity(text.len() + 1);
        for label in text.trim_end_matches('.').split('.') {
            // Labels are validated above: 1 to 63 ASCII bytes each.
            wire.push(label.len() as u8);
            wire.extend_from_slice(label.as_bytes());
        }
        wire.push(0);
        self.interior.insert(name.base_name());
        self.aliases.insert(name, addrs);
        self.wire.insert(wire.into_boxed_slice(), addrs);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.aliases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty()
    }

    /// The SOA serial of this generation; [`Records::replace`] counts it up.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// The listener addresses of a name (case-insensitive, trailing dot
    /// optional), `None` if unknown or not a valid name.
    pub fn lookup(&self, name: &str) -> Option<ListenerAddrs> {
        let mut name = Name::from_str(name).ok()?;
        name.set_fqdn(true);
        match self.state(&LowerName::new(&name)) {
            NameState::Alias(addrs) => Some(addrs),
            NameState::Interior | NameState::Unknown => None,
        }
    }

    /// Every record as (`api.dev.gstacks`, addresses), in no order.
    pub fn entries(&self) -> impl Iterator<Item = (String, ListenerAddrs)> + '_ {
        self.aliases.iter().map(|(name, addrs)| {
            let mut text = name.to_string();
            if text.ends_with('.') {
                text.pop();
            }
            (text, *addrs)
        })
    }

    /// The record of a name in lower-case wire form (see `wire`).
    pub(crate) fn lookup_wire(&self, name: &[u8]) -> Option<ListenerAddrs> {
        self.wire.get(name).copied()
    }

    /// True for `gstacks.` and every name below it.
    pub(crate) fn is_ours(&self, name: &LowerName) -> bool {
        self.apex.zone_of(name)
    }

    pub(crate) fn apex(&self) -> &LowerName {
        &self.apex
    }

    /// Only meaningful for names where [`Self::is_ours`] holds.
    pub(crate) fn state(&self, name: &LowerName) -> NameState {
        if let Some(addrs) = self.aliases.get(name) {
            NameState::Alias(*addrs)
        } else if self.interior.contains(name) {
            NameState::Interior
        } else {
            NameState::Unknown
        }
    }
}

fn apex_name() -> Name {
    let mut name = Name::from_ascii(DNS_SUFFIX).unwrap_or_else(|_| Name::root());
    name.set_fqdn(true);
    name
}

fn validate_label(kind: &'static str, label: &str) -> Result<(), DnsError> {
    let fail = |reason| {
        Err(DnsError::InvalidLabel {
            kind,
            label: label.to_string(),
            reason,
        })
    };
    if label.is_empty() {
        return fail("is empty");
    }
    if label.len() > 63 {
        return fail("is longer than 63 characters");
    }
    if !label
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return fail("may only hold letters, digits and hyphens");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return fail("may not start or end with a hyphen");
    }
    Ok(())
}

/// The live record table shared by the DNS handlers of an agent. Cloning is
/// cheap and every clone sees the same table.
///
/// Readers take a read lock only to clone an `Arc`, so a query never waits
/// for a netmap to be turned into a table; [`Records::replace`] swaps the
/// whole generation at once, so a query sees either the old or the new table.
#[derive(Clone, Default)]
pub struct Records {
    current: Arc<RwLock<Arc<RecordTable>>>,
    /// Counts replacements, so that a [`TableCache`] can tell with one atomic
    /// load that its table is still current.
    generation: Arc<AtomicU64>,
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Records").field(&*self.snapshot()).finish()
    }
}

impl Records {
    pub fn new(table: RecordTable) -> Self {
        Records {
            current: Arc::new(RwLock::new(Arc::new(table))),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current generation; later replacements do not change it.
    pub fn snapshot(&self) -> Arc<RecordTable> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `table` the current generation (its SOA serial one above the
    /// previous one) and returns the previous generation.
    pub fn replace(&self, mut table: RecordTable) -> Arc<RecordTable> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        table.serial = current.serial.wrapping_add(1);
        let previous = std::mem::replace(&mut *current, Arc::new(table));
        self.generation.fetch_add(1, Ordering::Release);
        previous
    }

    /// Shortcut for `snapshot().lookup(name)`.
    pub fn lookup(&self, name: &str) -> Option<ListenerAddrs> {
        self.snapshot().lookup(name)
    }

    /// Number of records in the current generation (the "DNS records loaded"
    /// diagnostic).
    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot().is_empty()
    }
}

/// One reader's copy of the current table (a UDP receive task keeps one):
/// [`TableCache::current`] costs one atomic load while the table is
/// unchanged, and takes the read lock only after a replacement.
pub(crate) struct TableCache {
    records: Records,
    generation: u64,
    table: Arc<RecordTable>,
}

impl TableCache {
    pub(crate) fn new(records: &Records) -> Self {
        let generation = records.generation.load(Ordering::Acquire);
        TableCache {
            records: records.clone(),
            generation,
            table: records.snapshot(),
        }
    }

    pub(crate) fn current(&mut self) -> &Arc<RecordTable> {
        let generation = self.records.generation.load(Ordering::Acquire);
        if generation != self.generation {
            // A replacement racing with this load is seen by the next call.
            self.table = self.records.snapshot();
            self.generation = generation;
        }
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(last: u8) -> ListenerAddrs {
        ListenerAddrs::v4(Ipv4Addr::new(127, 77, 0, last))
    }

    fn lower(text: &str) -> LowerName {
        LowerName::new(&Name::from_str(text).unwrap())
    }

    #[test]
    fn lookup_is_case_insensitive_and_tolerates_a_trailing_dot() {
        let mut table = RecordTable::new();
        table.insert("dev", "api", addrs(1)).unwrap();
        table.insert("Dev", "DB", addrs(2)).unwrap();
        assert_eq!(table.lookup("api.dev.gstacks"), Some(addrs(1)));
        assert_eq!(table.lookup("API.Dev.GStacks."), Some(addrs(1)));
        assert_eq!(table.lookup("db.dev.gstacks"), Some(addrs(2)));
        assert_eq!(table.lookup("web.dev.gstacks"), None);
        assert_eq!(table.lookup("api.prod.gstacks"), None);
        assert_eq!(table.lookup("dev.gstacks"), None);
        assert_eq!(table.lookup(""), None);
        assert_eq!(table.lookup("a..b"), None);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn names_between_the_apex_and_an_alias_exist_without_addresses() {
        let mut table = RecordTable::new();
        table.insert("dev", "api", addrs(1)).unwrap();
        assert_eq!(table.state(&lower("gstacks.")), NameState::Interior);
        assert_eq!(table.state(&lower("DEV.gstacks.")), NameState::Interior);
        assert_eq!(table.state(&lower("prod.gstacks.")), NameState::Unknown);
        assert_eq!(
            table.state(&lower("x.api.dev.gstacks.")),
            NameState::Unknown
        );
        assert_eq!(
            table.state(&lower("api.dev.gstacks.")),
            NameState::Alias(addrs(1))
        );
        assert!(table.is_ours(&lower("anything.gstacks.")));
        assert!(table.is_ours(&lower("GSTACKS.")));
        assert!(!table.is_ours(&lower("gstacks.example.com.")));
        assert!(!table.is_ours(&lower("notgstacks.")));
        assert!(!table.is_ours(&lower(".")));
    }

    #[test]
    fn bad_labels_and_duplicates_are_refused_with_the_name() {
        let mut table = RecordTable::new();
        table.insert("dev", "api", addrs(1)).unwrap();
        let err = table.insert("dev", "API", addrs(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "DNS record `api.dev.gstacks` is listed twice"
        );
        for (network, alias, needle) in [
            ("dev", "", "alias `` for a DNS name: is empty"),
            ("", "api", "network ``"),
            ("dev", "a.b", "alias `a.b`"),
            ("dev", "-api", "hyphen"),
            ("de v", "api", "network `de v`"),
            ("dev", "ápi", "letters, digits"),
        ] {
            let err = table.insert(network, alias, addrs(3)).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let long = "a".repeat(64);
        let err = table.insert("dev", &long, addrs(3)).unwrap_err();
        assert!(err.to_string().contains("longer than 63"), "{err}");
        table.insert("dev", &"a".repeat(63), addrs(3)).unwrap();
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn replace_swaps_the_whole_generation_and_counts_the_serial() {
        let records = Records::default();
        assert!(records.is_empty());
        let before = records.snapshot();

        let mut table = RecordTable::new();
        table.insert("dev", "api", addrs(1)).unwrap();
        let previous = records.replace(table);
        assert!(previous.is_empty());
        assert_eq!(records.lookup("api.dev.gstacks"), Some(addrs(1)));
        assert_eq!(records.snapshot().serial(), 1);
        // A snapshot taken earlier keeps its generation.
        assert_eq!(before.lookup("api.dev.gstacks"), None);

        let clone = records.clone();
        let mut table = RecordTable::new();
        table
            .insert("dev", "db", addrs(2).with_ipv6(Ipv6Addr::LOCALHOST))
            .unwrap();
        records.replace(table);
        assert_eq!(clone.lookup("api.dev.gstacks"), None);
        assert_eq!(
            clone.lookup("db.dev.gstacks"),
            Some(addrs(2).with_ipv6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(clone.snapshot().serial(), 2);
        let entries: Vec<_> = clone.snapshot().entries().collect();
        assert_eq!(
            entries,
            vec![(
                "db.dev.gstacks".to_string(),
                addrs(2).with_ipv6(Ipv6Addr::LOCALHOST)
            )]
        );
    }
}
