//! Live proxied connections, with the rule that allowed each, so that every
//! new netmap can decide them again: a connection that is no longer allowed
//! is closed (its token cancelled) at once, the others are left alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use policy::Decision;
use tokio_util::sync::CancellationToken;

use super::topology::{Identity, Topology};

/// Which end of the path a connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Accepted by an alias listener of this agent.
    Source,
    /// Accepted from the mesh, forwarded into a sandbox of this host.
    Target,
}

/// Counters of the data path.
#[derive(Debug, Default)]
pub struct NetworkStats {
    /// Connections allowed at the source (alias listeners).
    pub allowed: AtomicU64,
    /// Connections denied at the source.
    pub denied: AtomicU64,
    /// Mesh connections admitted at the target.
    pub mesh_allowed: AtomicU64,
    /// Mesh connections refused at the target (policy or a bad claim).
    pub mesh_denied: AtomicU64,
    /// Established connections closed because they were no longer allowed.
    pub revoked: AtomicU64,
    /// Allowed connections that could not be completed (mesh dial failed,
    /// target refused or unreachable).
    pub failed: AtomicU64,
    /// Denial events that did not fit in the outbox.
    pub events_dropped: AtomicU64,
}

impl NetworkStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Live {
    side: Side,
    network: String,
    alias: String,
    port: u16,
    identity: Identity,
    rule_id: String,
    revoked: CancellationToken,
}

/// What the re-decision closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub side: Side,
    pub network: String,
    pub alias: String,
    pub port: u16,
    pub identity: Identity,
    pub rule_id: String,
    pub reason: String,
}

/// The registry. A connection's token is cancelled either by [`Self::recheck`]
/// (no longer allowed) or by its own end (the proxy cancels it when the
/// connection finishes); cancelled entries are pruned.
#[derive(Debug, Default)]
pub struct Connections {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
    /// Prune when the map grows past this (amortised O(1) per insert).
    prune_at: AtomicU64,
}

impl Connections {
    /// Registers a connection allowed by `rule_id`; the token ends it.
    pub fn register(
        &self,
        side: Side,
        network: &str,
        alias: &str,
        port: u16,
        identity: Identity,
        rule_id: &str,
    ) -> CancellationToken {
        let token = CancellationToken::new();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.len() as u64 >= self.prune_at.load(Ordering::Relaxed).max(64) {
            live.retain(|_, c| !c.revoked.is_cancelled());
            self.prune_at
                .store(live.len() as u64 * 2, Ordering::Relaxed);
        }
        live.insert(
            id,
            Live {
                side,
                network: network.to_owned(),
                alias: alias.to_owned(),
                port,
                identity,
                rule_id: rule_id.to_owned(),
                revoked: token.clone(),
            },
        );
        token
    }

    /// Connections still open.
    pub fn count(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.values().filter(|c| !c.revoked.is_cancelled()).count()
    }

    /// Decides every open connection again with `topology`; closes those no
    /// longer allowed and returns them. A connection allowed by another rule
    /// now stays open (and remembers the new rule).
    pub fn recheck(&self, topology: &Topology) -> Vec<Revoked> {
        let mut closed = Vec::new();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, c| !c.revoked.is_cancelled());
        live.retain(|_, c| {
            let outcome = topology.decide_for(&c.network, &c.identity, &c.alias, c.port);
            let still_here = match c.side {
                // The target must still host the alias.
                Side::Target => topology.sandbox_address(&c.network, &c.alias, c.port).err(),
                Side::Source => None,
            };
            let reason = match (outcome, still_here) {
                (_, Some(gone)) => gone,
                (Ok((_, Decision::Allow { rule_id })), None) => {
                    c.rule_id = rule_id;
                    return true;
                }
                (Ok((_, decision)), None) => decision.to_string(),
                (Err(why), None) => why,
            };
            c.revoked.cancel();
            closed.push(Revoked {
                side: c.side,
                network: c.network.clone(),
                alias: c.alias.clone(),
                port: c.port,
                identity: c.identity.clone(),
                rule_id: c.rule_id.clone(),
                reason,
            });
            false
        });
        closed
    }

    /// Closes everything (the network module stops).
    pub fn close_all(&self) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        for c in live.values() {
            c.revoked.cancel();
        }
        live.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::topology::tests::netmap;
    use super::*;

    #[test]
    fn recheck_closes_only_what_is_no_longer_allowed() {
        let topo = Topology::from_netmap(&netmap(), "h1");
        let conns = Connections::default();
        let web = Identity::Sandbox("sbx_web".into());
        let kept = conns.register(Side::Source, "dev", "api", 8080, web.clone(), "pol_1");
        let ended = conns.register(Side::Source, "dev", "api", 8080, web.clone(), "pol_1");
        ended.cancel();
        assert_eq!(conns.count(), 1);
        assert!(conns.recheck(&topo).is_empty());
        assert!(!kept.is_cancelled());

        // The same rule under a new id: still allowed, kept.
        let mut map = netmap();
        map.policy_rules[0].id = "pol_2".into();
        assert!(conns.recheck(&Topology::from_netmap(&map, "h1")).is_empty());
        assert!(!kept.is_cancelled());

        // The rule removed: closed, with the rule it had and the reason.
        map.policy_rules.clear();
        let closed = conns.recheck(&Topology::from_netmap(&map, "h1"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].rule_id, "pol_2");
        assert!(closed[0].reason.contains("no rule"), "{}", closed[0].reason);
        assert!(kept.is_cancelled());
        assert_eq!(conns.count(), 0);
    }

    #[test]
    fn detach_closes_the_connections_of_the_sandbox() {
        let conns = Connections::default();
        let token = conns.register(
            Side::Source,
            "dev",
            "api",
            8080,
            Identity::Sandbox("sbx_web".into()),
            "pol_1",
        );
        let mut map = netmap();
        map.sandboxes.retain(|s| s.sandbox_id != "sbx_web");
        map.networks[0].aliases.retain(|a| a.alias != "web");
        let closed = conns.recheck(&Topology::from_netmap(&map, "h1"));
        assert_eq!(closed.len(), 1);
        assert!(
            closed[0].reason.contains("not attached"),
            "{}",
            closed[0].reason
        );
        assert!(token.is_cancelled());
    }
}
