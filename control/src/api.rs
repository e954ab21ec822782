//! `ControlApi`: the operator API behind `gstacks`. Every call is
//! authorised by an operator token.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ControlError;
use crate::plane::ControlPlane;
use crate::sandboxes::sandbox_view;
use crate::store::{ProvisioningToken, SandboxFilter, TokenUsage};
use proto::control_api_server::ControlApi;
use proto::*;

#[derive(Debug, Clone)]
pub struct OperatorApi {
    plane: Arc<ControlPlane>,
}

impl OperatorApi {
    pub fn new(plane: Arc<ControlPlane>) -> OperatorApi {
        OperatorApi { plane }
    }
}

fn token_view(token: ProvisioningToken, hosts_enrolled: u32) -> proto::ProvisioningToken {
    proto::ProvisioningToken {
        id: token.id,
        cluster_id: token.cluster_id,
        description: token.description,
        long_living: token.long_living,
        created_at_ms: token.created_at_ms,
        expires_at_ms: token.expires_at_ms,
        revoked_at_ms: token.revoked_at_ms,
        hosts_enrolled,
    }
}

fn hosts_enrolled(plane: &ControlPlane, token_id: &str) -> Result<u32, Status> {
    Ok(plane
        .store
        .provisioning_tokens(None)?
        .into_iter()
        .find(|usage| usage.token.id == token_id)
        .map_or(0, |usage| usage.hosts_enrolled))
}

fn cluster_filter(id: &str) -> Option<&str> {
    let id = id.trim();
    (!id.is_empty()).then_some(id)
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ControlApi for OperatorApi {
    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let clusters = self
            .plane
            .store
            .clusters()?
            .into_iter()
            .map(|c| Cluster {
                id: c.id,
                name: c.name,
                kind: c.kind,
                is_default: c.is_default,
            })
            .collect();
        Ok(Response::new(ListClustersResponse { clusters }))
    }

    async fn create_provisioning_token(
        &self,
        request: Request<CreateProvisioningTokenRequest>,
    ) -> Result<Response<CreateProvisioningTokenResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let cluster = cluster_filter(&request.cluster_id)
            .ok_or_else(|| Status::invalid_argument("a cluster id is required (`--cluster`)"))?;
        let ttl = (request.ttl_secs > 0).then(|| Duration::from_secs(request.ttl_secs));
        let (token, secret) = self.plane.create_provisioning_token(
            cluster,
            &request.description,
            request.long_living,
            ttl,
        )?;
        Ok(Response::new(CreateProvisioningTokenResponse {
            token: Some(token_view(token, 0)),
            secret: secret.expose().to_owned(),
        }))
    }

    async fn list_provisioning_tokens(
        &self,
        request: Request<ListProvisioningTokensRequest>,
    ) -> Result<Response<ListProvisioningTokensResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let tokens = self
            .plane
            .store
            .provisioning_tokens(cluster_filter(&request.cluster_id))?
            .into_iter()
            .map(
                |TokenUsage {
                     token,
                     hosts_enrolled,
                 }| token_view(token, hosts_enrolled),
            )
            .collect();
        Ok(Response::new(ListProvisioningTokensResponse { tokens }))
    }

    async fn revoke_provisioning_token(
        &self,
        request: Request<RevokeProvisioningTokenRequest>,
    ) -> Result<Response<RevokeProvisioningTokenResponse>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let (token, revoked_host_ids) = self.plane.revoke_provisioning_token(&request.id, &who)?;
        let enrolled = hosts_enrolled(&self.plane, &token.id)?;
        Ok(Response::new(RevokeProvisioningTokenResponse {
            token: Some(token_view(token, enrolled)),
            revoked_host_ids,
        }))
    }

    async fn list_hosts(
        &self,
        request: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let hosts = self
            .plane
            .store
            .hosts(cluster_filter(&request.cluster_id))?
            .into_iter()
            .map(|host| self.plane.host_view(host))
            .collect();
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn get_host(
        &self,
        request: Request<GetHostRequest>,
    ) -> Result<Response<HostRecord>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let id = request.into_inner().id;
        let host = self
            .plane
            .store
            .host(&id)?
            .ok_or(ControlError::HostNotFound(id))?;
        Ok(Response::new(self.plane.host_view(host)))
    }

    async fn revoke_host(
        &self,
        request: Request<RevokeHostRequest>,
    ) -> Result<Response<HostRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let host = self.plane.revoke_host(&request.into_inner().id, &who)?;
        Ok(Response::new(self.plane.host_view(host)))
    }

    type HostLogsStream = Boxed<HostEvent>;

    async fn host_logs(
        &self,
        request: Request<HostLogsRequest>,
    ) -> Result<Response<Self::HostLogsStream>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let host_id = request.host_id;
        if self.plane.store.host(&host_id)?.is_none() {
            return Err(ControlError::HostNotFound(host_id).into());
        }
        // Subscribe before reading, so nothing falls between the two.
        let mut wake = self.plane.subscribe_events();
        let tail = (request.tail > 0).then_some(request.tail);
        let backlog = self.plane.store.host_events(&host_id, 0, tail)?;
        let (tx, rx) = mpsc::channel(256);
        let plane = self.plane.clone();
        let follow = request.follow;
        tokio::spawn(async move {
            let mut last = 0;
            let send_all = |events: Vec<crate::store::StoredEvent>, last: &mut u64| {
                let tx = tx.clone();
                let host_id = host_id.clone();
                let mut out = Vec::with_capacity(events.len());
                for stored in events {
                    *last = stored.seq;
                    out.push(HostEvent {
                        seq: stored.seq,
                        host_id: host_id.clone(),
                        event: Some(stored.event),
                    });
                }
                async move {
                    for event in out {
                        if tx.send(Ok(event)).await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            };
            if !send_all(backlog, &mut last).await || !follow {
                return;
            }
            loop {
                tokio::select! {
                    woke = wake.recv() => match woke {
                        Ok(id) if id != host_id => continue,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                }
                match plane.store.host_events(&host_id, last, None) {
                    Ok(events) => {
                        if !send_all(events, &mut last).await {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type HostTerminalStream = Boxed<TerminalServerMessage>;

    async fn host_terminal(
        &self,
        request: Request<Streaming<TerminalClientMessage>>,
    ) -> Result<Response<Self::HostTerminalStream>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let mut client = request.into_inner();
        let terminal = crate::terminal::open(&self.plane, who, &mut client).await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(crate::terminal::relay(
            self.plane.clone(),
            terminal,
            client,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_network(
        &self,
        request: Request<CreateNetworkRequest>,
    ) -> Result<Response<NetworkRecord>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let record = self.plane.create_network(&request.into_inner().name)?;
        Ok(Response::new(record))
    }

    async fn list_networks(
        &self,
        request: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let (networks, topology_version) = self.plane.list_networks()?;
        Ok(Response::new(ListNetworksResponse {
            networks,
            topology_version,
        }))
    }

    async fn get_network(
        &self,
        request: Request<GetNetworkRequest>,
    ) -> Result<Response<NetworkRecord>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let name = request.into_inner().name;
        Ok(Response::new(self.plane.network_record(name.trim())?))
    }

    async fn attach_sandbox(
        &self,
        request: Request<AttachSandboxRequest>,
    ) -> Result<Response<NetworkChange>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let change =
            self.plane
                .attach_sandbox(r.network.trim(), r.sandbox_id.trim(), &r.alias, &r.ports)?;
        Ok(Response::new(change))
    }

    async fn detach_sandbox(
        &self,
        request: Request<DetachSandboxRequest>,
    ) -> Result<Response<NetworkChange>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let change = self
            .plane
            .detach_sandbox(r.network.trim(), r.sandbox_id.trim())?;
        Ok(Response::new(change))
    }

    async fn add_alias(
        &self,
        request: Request<AddAliasRequest>,
    ) -> Result<Response<NetworkChange>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let change =
            self.plane
                .add_alias(r.network.trim(), r.sandbox_id.trim(), &r.alias, &r.ports)?;
        Ok(Response::new(change))
    }

    async fn list_aliases(
        &self,
        request: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let aliases = self
            .plane
            .list_aliases(request.into_inner().network.trim())?;
        Ok(Response::new(ListAliasesResponse { aliases }))
    }

    async fn remove_alias(
        &self,
        request: Request<RemoveAliasRequest>,
    ) -> Result<Response<NetworkChange>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let change = self.plane.remove_alias(r.network.trim(), &r.alias)?;
        Ok(Response::new(change))
    }

    async fn allow_policy(
        &self,
        request: Request<AllowPolicyRequest>,
    ) -> Result<Response<AllowPolicyResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let (rule, topology_version) =
            self.plane
                .allow_policy(r.network.trim(), &r.from, &r.to, r.port)?;
        Ok(Response::new(AllowPolicyResponse {
            rule: Some(rule),
            topology_version,
        }))
    }

    async fn list_policy_rules(
        &self,
        request: Request<ListPolicyRulesRequest>,
    ) -> Result<Response<ListPolicyRulesResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let rules = self
            .plane
            .list_policy_rules(request.into_inner().network.trim())?;
        Ok(Response::new(ListPolicyRulesResponse { rules }))
    }

    async fn remove_policy_rule(
        &self,
        request: Request<RemovePolicyRuleRequest>,
    ) -> Result<Response<NetworkChange>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let change = self.plane.remove_policy_rule(r.network.trim(), &r.id)?;
        Ok(Response::new(change))
    }

    async fn resolve_alias(
        &self,
        request: Request<ResolveAliasRequest>,
    ) -> Result<Response<ResolveAliasResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let resolved = self.plane.resolve_alias(r.network.trim(), r.alias.trim())?;
        Ok(Response::new(resolved))
    }

    async fn test_network(
        &self,
        request: Request<TestNetworkRequest>,
    ) -> Result<Response<TestNetworkResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let r = request.into_inner();
        let outcome = self
            .plane
            .test_network(r.network.trim(), &r.source, r.alias.trim(), r.port)
            .await?;
        Ok(Response::new(outcome))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<SandboxRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let request = crate::sandboxes::CreateSandbox::from_proto(request.into_inner());
        let sandbox = self.plane.create_sandbox(request, &who).await?;
        crate::sandbox_io::start_repo_bootstrap(&self.plane, &sandbox);
        Ok(Response::new(sandbox_view(sandbox)))
    }

    async fn list_sandboxes(
        &self,
        request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let filter = SandboxFilter {
            cluster_id: cluster_filter(&request.cluster_id).map(str::to_owned),
            host_id: cluster_filter(&request.host_id).map(str::to_owned),
            exclude_archived: request.exclude_archived,
            ..SandboxFilter::default()
        };
        let sandboxes = self
            .plane
            .store
            .sandboxes(&filter)?
            .into_iter()
            .map(sandbox_view)
            .collect();
        Ok(Response::new(ListSandboxesResponse { sandboxes }))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<GetSandboxResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let sandbox = self.plane.sandbox_record(&request.into_inner().id)?;
        let history = self
            .plane
            .store
            .sandbox_events(&sandbox.id, 0, None)?
            .into_iter()
            .map(|stored| SandboxEvent {
                seq: stored.seq,
                sandbox_id: stored.sandbox_id,
                event: Some(stored.event),
            })
            .collect();
        let topology = self.plane.store.topology()?;
        let networks = topology
            .attachments
            .iter()
            .filter(|a| a.sandbox_id == sandbox.id)
            .map(|a| SandboxNetworkView {
                network: a.network.clone(),
                aliases: topology
                    .aliases
                    .iter()
                    .filter(|alias| alias.sandbox_id == sandbox.id && alias.network == a.network)
                    .map(|alias| SandboxAliasView {
                        alias: alias.alias.clone(),
                        name: format!(
                            "{}.{}",
                            alias.alias,
                            crate::store::network::dns_suffix(&alias.network)
                        ),
                        ports: alias.ports.iter().map(|p| u32::from(*p)).collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(GetSandboxResponse {
            sandbox: Some(sandbox_view(sandbox)),
            history,
            networks,
        }))
    }

    async fn start_sandbox(
        &self,
        request: Request<SandboxRequest>,
    ) -> Result<Response<SandboxRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let sandbox = self
            .plane
            .start_sandbox(&request.into_inner().id, &who)
            .await?;
        Ok(Response::new(sandbox_view(sandbox)))
    }

    async fn stop_sandbox(
        &self,
        request: Request<SandboxRequest>,
    ) -> Result<Response<SandboxRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let sandbox = self
            .plane
            .stop_sandbox(&request.into_inner().id, &who)
            .await?;
        Ok(Response::new(sandbox_view(sandbox)))
    }

    async fn reprovision_sandbox(
        &self,
        request: Request<SandboxRequest>,
    ) -> Result<Response<SandboxRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let sandbox = self
            .plane
            .reprovision_sandbox(&request.into_inner().id, &who)
            .await?;
        crate::sandbox_io::start_repo_bootstrap(&self.plane, &sandbox);
        Ok(Response::new(sandbox_view(sandbox)))
    }

    async fn deprovision_sandbox(
        &self,
        request: Request<SandboxRequest>,
    ) -> Result<Response<SandboxRecord>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let sandbox = self
            .plane
            .deprovision_sandbox(&request.into_inner().id, &who)
            .await?;
        Ok(Response::new(sandbox_view(sandbox)))
    }

    async fn mesh_join(
        &self,
        request: Request<MeshJoinRequest>,
    ) -> Result<Response<MeshJoinResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let request = request.into_inner();
        let joined = self
            .plane
            .mesh_join(&request.network, request.ttl_secs)
            .await?;
        Ok(Response::new(joined))
    }

    async fn revoke_mesh_node(
        &self,
        request: Request<RevokeMeshNodeRequest>,
    ) -> Result<Response<RevokeMeshNodeResponse>, Status> {
        let who = self.plane.authorize_operator(request.metadata())?;
        let revoked = self
            .plane
            .revoke_mesh_node(&request.into_inner().node_id, &who)?;
        Ok(Response::new(revoked))
    }

    type SandboxLogsStream = Boxed<SandboxLogsChunk>;

    async fn sandbox_logs(
        &self,
        request: Request<SandboxLogsRequest>,
    ) -> Result<Response<Self::SandboxLogsStream>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let rx = crate::sandbox_io::logs(&self.plane, request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sandbox_files_list(
        &self,
        request: Request<SandboxFilesListRequest>,
    ) -> Result<Response<SandboxFilesListResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let listing = crate::sandbox_io::list(&self.plane, request.into_inner()).await?;
        Ok(Response::new(listing))
    }

    type SandboxFileGetStream = Boxed<SandboxFileData>;

    async fn sandbox_file_get(
        &self,
        request: Request<SandboxFileGetRequest>,
    ) -> Result<Response<Self::SandboxFileGetStream>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let rx = crate::sandbox_io::get(&self.plane, request.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sandbox_file_put(
        &self,
        request: Request<Streaming<SandboxFilePutMessage>>,
    ) -> Result<Response<SandboxFilePutResponse>, Status> {
        self.plane.authorize_operator(request.metadata())?;
        let done = crate::sandbox_io::put(&self.plane, request.into_inner()).await?;
        Ok(Response::new(done))
    }
}
