//! Netmap delivery over the agents' control streams.
//!
//! One task ([`run`]) owns every send, so a host never receives an older
//! netmap after a newer one. It wakes on two things:
//! - a new committed topology version (the store's watch): it reads one
//!   snapshot, prepares it once ([`NetmapIndex`]) and sends each connected
//!   host its netmap if its content differs from the last one that host got
//!   (so only the hosts a change concerns hear about it);
//! - a Hello: that host gets its netmap at once, changed or not (it needs its
//!   overlay addresses, and a reconnecting agent the current version).
//!
//! A host whose outbound queue is full is retried shortly after; what it
//! gets then is the netmap of that moment (netmaps supersede each other).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::netmap::NetmapIndex;
use crate::plane::ControlPlane;
use crate::sessions::{HostSession, TrySendError};
use proto::{control_message, ControlMessage, Netmap};

/// Wait before retrying hosts whose queue was full.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// What a host was last sent on which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    conn_id: u64,
    version: u64,
    digest: [u8; 32],
}

/// Shared state between the session handlers and the delivery task.
#[derive(Debug, Default)]
pub struct NetmapDelivery {
    /// Hosts that said hello and wait for their netmap.
    hellos: Mutex<HashSet<String>>,
    wake: Notify,
    sent: Mutex<HashMap<String, Sent>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NetmapDelivery {
    /// A host said hello: send it its netmap now.
    pub fn after_hello(&self, host_id: &str) {
        lock(&self.hellos).insert(host_id.to_owned());
        self.wake.notify_one();
    }

    /// The version of the last netmap queued for the host, if its content is
    /// still current; None when the host has not been sent one yet or a
    /// newer one is on its way.
    pub fn current_version_sent(&self, host_id: &str, index: &NetmapIndex) -> Option<u64> {
        let sent = lock(&self.sent).get(host_id).copied()?;
        (Some(sent.digest) == index.digest_for_host(host_id)).then_some(sent.version)
    }

    fn take_hellos(&self) -> HashSet<String> {
        std::mem::take(&mut *lock(&self.hellos))
    }
}

fn netmap_message(netmap: Netmap) -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::Netmap(netmap)),
    }
}

/// Sends `session` its netmap from `index` unless it already has the same
/// content on this stream (or `force`). Returns false when its queue was full.
fn deliver(
    delivery: &NetmapDelivery,
    index: &NetmapIndex,
    session: &HostSession,
    force: bool,
) -> bool {
    let Some(digest) = index.digest_for_host(&session.host_id) else {
        // No node yet (the Hello that creates it is still being handled).
        return true;
    };
    let previous = lock(&delivery.sent).get(&session.host_id).copied();
    let fresh_stream = previous.is_none_or(|p| p.conn_id != session.conn_id());
    if !force && !fresh_stream && previous.is_some_and(|p| p.digest == digest) {
        return true;
    }
    let Some(netmap) = index.for_host(&session.host_id) else {
        return true;
    };
    let version = netmap.topology_version;
    match session.try_send(netmap_message(netmap)) {
        Ok(()) => {
            lock(&delivery.sent).insert(
                session.host_id.clone(),
                Sent {
                    conn_id: session.conn_id(),
                    version,
                    digest,
                },
            );
            tracing::debug!(host = %session.host_id, version, "netmap sent");
            true
        }
        Err(TrySendError::Full) => false,
        Err(TrySendError::Closed) => true,
    }
}

/// The delivery task; runs until the process ends.
pub async fn run(plane: Arc<ControlPlane>) {
    let mut versions = plane.store.subscribe_topology();
    versions.borrow_and_update();
    // Hosts whose queue was full, retried after a pause; `force` carried.
    let mut retry: HashMap<String, bool> = HashMap::new();
    loop {
        let mut all = false;
        tokio::select! {
            () = plane.netmaps.wake.notified() => {}
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
                versions.borrow_and_update();
                all = true;
            }
            () = tokio::time::sleep(RETRY_AFTER), if !retry.is_empty() => {}
        }
        let hellos = plane.netmaps.take_hellos();
        let mut targets: HashMap<String, bool> = std::mem::take(&mut retry);
        for host in hellos {
            targets.insert(host, true);
        }
        // Reading the store and building netmaps is blocking work (seconds
        // when a network of 1,000 hosts changes): off the async workers.
        let pass_plane = plane.clone();
        match tokio::task::spawn_blocking(move || deliver_pass(&pass_plane, targets, all)).await {
            Ok(left) => retry = left,
            Err(err) => tracing::warn!(error = %err, "netmap delivery pass failed"),
        }
    }
}

/// One pass: reads the topology once, then delivers to `targets` (host ->
/// force) and, with `all`, checks every connected host. Returns the hosts to
/// retry (queue full, or the store could not be read).
fn deliver_pass(
    plane: &ControlPlane,
    mut targets: HashMap<String, bool>,
    all: bool,
) -> HashMap<String, bool> {
    let delivery = &plane.netmaps;
    if all {
        for session in plane.sessions.all() {
            targets.entry(session.host_id.clone()).or_insert(false);
        }
    }
    let topology = match plane.store.topology() {
        Ok(topology) => topology,
        Err(err) => {
            // Everyone is tried again after the pause.
            tracing::warn!(error = %err, "topology not read; netmaps not sent");
            return targets;
        }
    };
    let index = NetmapIndex::new(&topology);
    let checked = targets.len();
    let mut retry = HashMap::new();
    for (host, force) in targets {
        let Some(session) = plane.sessions.get(&host) else {
            continue;
        };
        if !deliver(delivery, &index, &session, force) {
            retry.insert(host, force);
        }
    }
    tracing::debug!(
        version = index.version(),
        checked,
        queue_full = retry.len(),
        "netmaps delivered"
    );
    retry
}
