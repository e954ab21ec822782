//! The two ends of a proxied connection inside the agent.
//!
//! Source side ([`serve_alias`]): an alias listener accepts, identifies the
//! source by its address (a sandbox of this host), decides with policy,
//! dials the target agent over the mesh with the header (or, when the alias
//! runs on this host, connects to its sandbox directly), then splices until
//! both sides are done or the connection is no longer allowed.
//!
//! Target side ([`serve_mesh`]): `proxy::accept_from_mesh` on overlay port
//! 4180; the claim in the header is checked against the mesh peer it came
//! from, policy decides again, and the sandbox's address is admitted.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use policy::Decision;
use proxy::{Admission, MeshHeader};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::connections::Side;
use super::topology::{Identity, ListenerKey};
use super::Shared;

/// Pause after an accept error (e.g. out of file descriptors) before the
/// next accept, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
const BACKLOG: i32 = 1024;

/// A TCP listener on `addr`. `freebind`: the address may not be configured
/// on an interface yet (container-side addresses routed to this host).
pub fn bind(addr: SocketAddr, freebind: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if freebind {
        let result = if addr.is_ipv4() {
            socket.set_freebind_v4(true)
        } else {
            socket.set_freebind_v6(true)
        };
        if let Err(e) = result {
            tracing::debug!(%addr, error = %e, "IP_FREEBIND not set");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Serves one alias listener until its task is aborted, at most
/// `GLOBALSTACKS_AGENT_MESH_MAX_LISTENER_CONNECTIONS` connections at once;
/// more wait in the kernel backlog (so a flood cannot exhaust the agent's
/// file descriptors).
pub(super) async fn serve_alias(shared: Arc<Shared>, key: ListenerKey, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(shared.settings.max_listener_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listener = %key, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let shared = shared.clone();
        let key = key.clone();
        tokio::spawn(async move {
            serve_source(&shared, &key, stream, from).await;
            drop(permit);
        });
    }
}

async fn serve_source(shared: &Shared, key: &ListenerKey, mut stream: TcpStream, from: SocketAddr) {
    let topology = shared.topology();
    let deny = |source: &str, reason: &str| {
        shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        shared.report_denied(
            "source",
            (&key.network, &key.alias, key.port),
            source,
            None,
            reason,
        );
    };
    let Some(sandbox_id) = topology.local_sandbox_at(from.ip()) else {
        deny(
            &from.ip().to_string(),
            &format!(
                "denied: {} is not the address of a sandbox on this host",
                from.ip()
            ),
        );
        return;
    };
    let identity = Identity::Sandbox(sandbox_id.to_owned());
    let (source, decision) =
        match topology.decide_for(&key.network, &identity, &key.alias, key.port) {
            Ok(decided) => decided,
            Err(reason) => return deny(&identity.to_string(), &reason),
        };
    let rule_id = match decision {
        Decision::Allow { rule_id } => rule_id,
        denied => return deny(&identity.to_string(), &denied.to_string()),
    };
    shared.stats.allowed.fetch_add(1, Ordering::Relaxed);
    let revoked = shared.connections.register(
        Side::Source,
        &key.network,
        &key.alias,
        key.port,
        identity.clone(),
        &rule_id,
    );
    let _ended = revoked.clone().drop_guard();
    let _ = stream.set_nodelay(true);
    let Some(alias) = topology
        .networks
        .get(&key.network)
        .and_then(|n| n.aliases.get(&key.alias))
    else {
        return;
    };
    let failed = |why: String| {
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(listener = %key, source = %identity, "connection failed: {why}");
    };
    if alias.host_id == topology.host_id {
        // The alias runs here: no mesh hop, the decision above is the
        // target's as well.
        let to = match topology.sandbox_address(&key.network, &key.alias, key.port) {
            Ok(to) => to,
            Err(why) => return failed(why),
        };
        let connect = tokio::select! {
            connect = TcpStream::connect(to) => connect,
            _ = revoked.cancelled() => return,
        };
        let mut upstream = match connect {
            Ok(upstream) => upstream,
            Err(e) => return failed(format!("cannot connect to {to}: {e}")),
        };
        let _ = upstream.set_nodelay(true);
        let _ = proxy::splice_until(&mut stream, &mut upstream, &revoked).await;
        return;
    }
    let Some(node) = shared.node() else {
        return failed("this agent has not joined the mesh".to_owned());
    };
    let Some(target_node) = alias.target_node else {
        return failed(format!(
            "no mesh node is known for host `{}`",
            alias.host_id
        ));
    };
    let header = MeshHeader {
        network: key.network.clone(),
        alias: key.alias.clone(),
        port: key.port,
        source,
    };
    let target = SocketAddr::new(target_node, proxy::MESH_PROXY_PORT);
    let dialed = tokio::select! {
        dialed = proxy::dial_over_mesh(&node, target, &header) => dialed,
        _ = revoked.cancelled() => return,
    };
    let mut upstream = match dialed {
        Ok(upstream) => upstream,
        Err(e) => return failed(e.to_string()),
    };
    // The target's refusal arrives as the first bytes from the mesh.
    if let Err(e) = proxy::splice_until(&mut stream, &mut upstream, &revoked).await {
        if let Some(refused) = proxy::refusal(&e) {
            failed(refused.to_string());
        }
    }
}

/// Target side: serves overlay port 4180 until the mesh node goes away.
pub(super) async fn serve_mesh(shared: Arc<Shared>, listener: netstack::TcpListener) {
    let resolve_shared = shared.clone();
    let resolve = move |header: &MeshHeader, from: SocketAddr| -> Result<Admission, String> {
        admit(&resolve_shared, header, from)
    };
    let max = shared.settings.max_mesh_connections;
    if let Err(e) = proxy::accept_from_mesh(listener, max, resolve).await {
        tracing::debug!(error = %e, "mesh acceptor stopped");
    }
}

fn admit(shared: &Shared, header: &MeshHeader, from: SocketAddr) -> Result<Admission, String> {
    let topology = shared.topology();
    let deny = |source: &str, rule: Option<&str>, reason: String| {
        shared.stats.mesh_denied.fetch_add(1, Ordering::Relaxed);
        shared.report_denied(
            "target",
            (&header.network, &header.alias, header.port),
            source,
            rule,
            &reason,
        );
        reason
    };
    let identity = topology
        .verify_claim(from.ip(), &header.source)
        .map_err(|reason| deny(&header.source.to_string(), None, reason))?;
    let (_, decision) = topology
        .decide_for(&header.network, &identity, &header.alias, header.port)
        .map_err(|reason| deny(&identity.to_string(), None, reason))?;
    let rule_id = match decision {
        Decision::Allow { rule_id } => rule_id,
        denied => return Err(deny(&identity.to_string(), None, denied.to_string())),
    };
    let to = topology
        .sandbox_address(&header.network, &header.alias, header.port)
        .map_err(|reason| {
            deny(
                &identity.to_string(),
                Some(&rule_id),
                format!("denied: {reason}"),
            )
        })?;
    shared.stats.mesh_allowed.fetch_add(1, Ordering::Relaxed);
    let revoked = shared.connections.register(
        Side::Target,
        &header.network,
        &header.alias,
        header.port,
        identity,
        &rule_id,
    );
    Ok(Admission { to, revoked })
}
