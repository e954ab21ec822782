//! `gstacks`: Operate GlobalStacks: hosts, tokens, sandboxes, networks, the mesh.

mod client;
mod config;
mod hosts;
mod mesh;
mod networks;
mod output;
mod sandbox_io;
mod sandboxes;
mod terminal;
mod tokens;

use std::path::PathBuf;

use anyhow::Context as _;

#[derive(clap::Parser, Debug)]
#[command(
    name = "gstacks",
    about = "Operate GlobalStacks: hosts, tokens, sandboxes, networks, the mesh",
    version,
    long_version = proto::build_info::LONG_VERSION
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Save the control plane URL, operator token and certificate (0600).
    Login {
        /// e.g. https://127.0.0.1:7443
        #[arg(long)]
        url: String,
        /// Operator token; default: GLOBALSTACKS_API_TOKEN, else one line from stdin.
        #[arg(long)]
        token: Option<String>,
        /// PEM certificate (or CA) the control plane presents.
        #[arg(long)]
        ca: PathBuf,
    },
    /// Hosts: list, show, logs, revoke, terminal.
    #[command(subcommand)]
    Host(HostCmd),
    /// Provisioning tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Runtime networks: aliases, attachments, policy, diagnostics.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Sandboxes: create, list, show, start, stop, reprovision, deprovision.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// This machine in a runtime network: join, status, forward, leave.
    #[command(subcommand)]
    Mesh(MeshCmd),
}

#[derive(clap::Subcommand, Debug)]
enum MeshCmd {
    /// Join a network as a `local` node with a short-lived credential.
    Join {
        network: String,
        /// Lifetime of the credential (e.g. 30m, 1h, 8h).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Network, addresses, credential expiry, peers, topology version.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Forward aliases of the network to local ports until Ctrl-C.
    Forward {
        network: String,
        /// <alias>:<port>, e.g. api:8080 (several allowed).
        #[arg(required = true)]
        targets: Vec<String>,
        /// Local port (127.0.0.1) or ip:port; one per target, in order, or
        /// several for a single target.
        #[arg(long = "local", required = true)]
        locals: Vec<String>,
    },
    /// Remove this node on the control plane and delete the local state.
    Leave {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum NetworkCmd {
    /// Create a network; its aliases are <alias>.<name>.gstacks.
    Create {
        /// A DNS label: lowercase letters, digits and `-`.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Networks with DNS suffix, topology version, members, aliases, rules.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One network: members, aliases, policy, denied connections.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach a sandbox, optionally publishing a first alias.
    Attach {
        network: String,
        sandbox_id: String,
        #[arg(long)]
        alias: Option<String>,
        /// A port the alias exposes (repeat for more; 1-65535).
        #[arg(long = "port", requires = "alias")]
        ports: Vec<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Detach a sandbox; its aliases in the network go with it.
    Detach {
        network: String,
        sandbox_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Aliases: add, list, remove.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Policy rules (default deny): allow, list, remove.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Where an alias leads: sandbox, host, mesh node.
    Resolve {
        network: String,
        alias: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask the participating agents whether SOURCE reaches ALIAS:PORT;
    /// exits 1 when a check fails.
    Test {
        network: String,
        /// `local`, an alias, `sandbox:<id>`, `tag:<tag>` or `*`.
        source: String,
        /// `<alias>:<port>`, e.g. api:8080.
        target: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AliasCmd {
    /// Publish another alias of an attached sandbox.
    Add {
        network: String,
        sandbox_id: String,
        alias: String,
        /// A port the alias exposes (repeat for more; 1-65535).
        #[arg(long = "port", required = true)]
        ports: Vec<u32>,
        #[arg(long)]
        json: bool,
    },
    List {
        network: String,
        #[arg(long)]
        json: bool,
    },
    Remove {
        network: String,
        alias: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum PolicyCmd {
    /// Allow SOURCE to reach an alias (and port; default any port).
    Allow {
        network: String,
        /// `local`, an alias, `sandbox:<id>`, `tag:<tag>` or `*`.
        #[arg(long)]
        from: String,
        /// An alias of the network, or `*`.
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    List {
        network: String,
        #[arg(long)]
        json: bool,
    },
    Remove {
        network: String,
        rule_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct SandboxCreateCmd {
    /// Cluster to place in (default: the default cluster).
    #[arg(long)]
    cluster_id: Option<String>,
    /// Place on this host.
    #[arg(long)]
    host_id: Option<String>,
    /// Required host tag, and a tag of the sandbox (repeatable).
    #[arg(long = "tag", value_name = "T")]
    tags: Vec<String>,
    /// Required host trait (repeatable).
    #[arg(long = "trait", value_name = "T")]
    traits: Vec<String>,
    /// Image reference (default: the control plane's default image).
    #[arg(long, value_name = "REF", conflicts_with = "blueprint")]
    image: Option<String>,
    /// Blueprint id or unique name.
    #[arg(long, value_name = "ID_OR_NAME")]
    blueprint: Option<String>,
    /// Repository to clone inside the sandbox.
    #[arg(long, value_name = "URL")]
    repo_url: Option<String>,
    #[arg(long, value_name = "B", requires = "repo_url")]
    repo_branch: Option<String>,
    #[arg(long, value_name = "P", requires = "repo_url")]
    repo_path: Option<String>,
    /// Bind mount HOST_PATH:CONTAINER_PATH[:ro] (repeatable).
    #[arg(long = "volume", value_name = "HOST_PATH:CONTAINER_PATH[:ro]")]
    volumes: Vec<String>,
    #[arg(long, value_name = "N")]
    name: Option<String>,
    /// Memory limit in MiB (default: the control plane's).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(4..=1_048_576))]
    memory: Option<u64>,
    /// CPU limit (e.g. 1.5).
    #[arg(long, value_name = "CPUS")]
    cpus: Option<f64>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum SandboxCmd {
    /// Place and create a sandbox on a connected host.
    Create(Box<SandboxCreateCmd>),
    /// Sandboxes with status, host, container and addresses (archived too).
    List {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// Leave archived sandboxes out.
        #[arg(long)]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    /// One sandbox in detail, with its activity history.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped sandbox.
    Start {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a running sandbox.
    Stop {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the container and create it again from the record.
    Reprovision {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the container through its host, then archive the record.
    Deprovision {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The container's output (stdout and stderr), through its host's agent.
    Logs {
        id: String,
        /// Keep streaming until the container stops (or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u32>,
    },
    /// An interactive shell (or COMMAND) in the sandbox, with a TTY.
    Terminal {
        id: String,
        /// Session limit in seconds (capped by the control plane; 0 = its limit).
        #[arg(long, default_value_t = 0)]
        max_duration: u32,
        /// Run this instead of /bin/sh.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Files in the sandbox: list, download, upload (streamed).
    #[command(subcommand)]
    Files(SandboxFilesCmd),
}

#[derive(clap::Subcommand, Debug)]
enum SandboxFilesCmd {
    /// A directory's entries, or one file's.
    Ls {
        id: String,
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Download PATH to LOCAL (default: its name in the current directory; `-` = stdout).
    Get {
        id: String,
        path: String,
        local: Option<PathBuf>,
    },
    /// Upload LOCAL (`-` = stdin) to PATH in the sandbox.
    Put {
        id: String,
        path: String,
        local: PathBuf,
    },
}

#[derive(clap::Subcommand, Debug)]
enum HostCmd {
    /// Hosts with status, version, arch, traits, tags and last seen.
    List {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One host in detail.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// The host's operational events.
    Logs {
        id: String,
        /// Keep printing new events as they arrive.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N stored events (0 = all).
        #[arg(long, default_value_t = 0)]
        tail: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Revoke the host's credential: no_token, disconnected, never placed.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Break-glass PTY shell on the host (recorded, time-bound).
    Terminal {
        host_id: String,
        /// Why you need a shell on the host (recorded with your token id).
        #[arg(long)]
        reason: String,
        /// Session limit in seconds (capped by the control plane; 0 = its limit).
        #[arg(long, default_value_t = 0)]
        max_duration: u32,
        /// Run this instead of the login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TokenCmd {
    /// Create a provisioning token (the secret is shown once).
    Create {
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Never expires (until revoked).
        #[arg(long)]
        long_living: bool,
        /// Lifetime of a short-lived token in seconds (default 24 h).
        #[arg(long, conflicts_with = "long_living")]
        ttl: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token and every host enrolled with it.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCmd {
    List {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args: Args = proto::build_info::parse_args();
    // The forwarder's mesh node and connections use both cores.
    let mut builder = if matches!(args.command, Cmd::Mesh(MeshCmd::Forward { .. })) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    // Do not wait for the terminal's stdin thread.
    std::process::exit(code);
}

async fn run(args: Args) -> anyhow::Result<i32> {
    if let Cmd::Login { url, token, ca } = args.command {
        login(url, token, ca).await?;
        return Ok(0);
    }
    let args = match args.command {
        // Only `join` needs the operator API; the rest works from the state.
        Cmd::Mesh(MeshCmd::Status { json }) => return mesh::status(json).await,
        Cmd::Mesh(MeshCmd::Leave { json }) => return mesh::leave(json).await,
        Cmd::Mesh(MeshCmd::Forward {
            network,
            targets,
            locals,
        }) => {
            let forwards = mesh::pair_forwards(&targets, &locals)?;
            return mesh::forward(network, forwards).await;
        }
        command => Args { command },
    };
    let resolved = config::resolve()?;
    let mut api = client::connect(&resolved).await?;
    match args.command {
        Cmd::Login { .. } => unreachable!("handled above"),
        Cmd::Host(cmd) => match cmd {
            HostCmd::List { cluster, json } => hosts::list(&mut api, cluster, json).await?,
            HostCmd::Show { id, json } => hosts::show(&mut api, id, json).await?,
            HostCmd::Logs {
                id,
                follow,
                tail,
                json,
            } => hosts::logs(&mut api, id, follow, tail, json).await?,
            HostCmd::Revoke { id, json } => hosts::revoke(&mut api, id, json).await?,
            HostCmd::Terminal {
                host_id,
                reason,
                max_duration,
                command,
            } => {
                return terminal::run(
                    &mut api,
                    terminal::Target::Host(host_id),
                    reason,
                    command,
                    max_duration,
                )
                .await;
            }
        },
        Cmd::Token(cmd) => match cmd {
            TokenCmd::Create {
                cluster,
                description,
                long_living,
                ttl,
                json,
            } => {
                tokens::create(
                    &mut api,
                    cluster,
                    description,
                    long_living,
                    ttl.unwrap_or(0),
                    json,
                )
                .await?
            }
            TokenCmd::List { cluster, json } => tokens::list(&mut api, cluster, json).await?,
            TokenCmd::Revoke { id, json } => tokens::revoke(&mut api, id, json).await?,
        },
        Cmd::Cluster(ClusterCmd::List { json }) => tokens::clusters(&mut api, json).await?,
        Cmd::Network(cmd) => return network(&mut api, cmd).await,
        Cmd::Sandbox(cmd) => return sandbox(&mut api, cmd).await,
        Cmd::Mesh(MeshCmd::Join { network, ttl, json }) => {
            return mesh::join(&mut api, &resolved, network, ttl, json).await
        }
        Cmd::Mesh(_) => unreachable!("handled above"),
    }
    Ok(0)
}

async fn network(api: &mut client::Api, cmd: NetworkCmd) -> anyhow::Result<i32> {
    match cmd {
        NetworkCmd::Create { name, json } => networks::create(api, name, json).await?,
        NetworkCmd::List { json } => networks::list(api, json).await?,
        NetworkCmd::Show { name, json } => networks::show(api, name, json).await?,
        NetworkCmd::Attach {
            network,
            sandbox_id,
            alias,
            ports,
            json,
        } => networks::attach(api, network, sandbox_id, alias, ports, json).await?,
        NetworkCmd::Detach {
            network,
            sandbox_id,
            json,
        } => networks::detach(api, network, sandbox_id, json).await?,
        NetworkCmd::Alias(AliasCmd::Add {
            network,
            sandbox_id,
            alias,
            ports,
            json,
        }) => networks::alias_add(api, network, sandbox_id, alias, ports, json).await?,
        NetworkCmd::Alias(AliasCmd::List { network, json }) => {
            networks::alias_list(api, network, json).await?
        }
        NetworkCmd::Alias(AliasCmd::Remove {
            network,
            alias,
            json,
        }) => networks::alias_remove(api, network, alias, json).await?,
        NetworkCmd::Policy(PolicyCmd::Allow {
            network,
            from,
            to,
            port,
            json,
        }) => networks::policy_allow(api, network, from, to, port, json).await?,
        NetworkCmd::Policy(PolicyCmd::List { network, json }) => {
            networks::policy_list(api, network, json).await?
        }
        NetworkCmd::Policy(PolicyCmd::Remove {
            network,
            rule_id,
            json,
        }) => networks::policy_remove(api, network, rule_id, json).await?,
        NetworkCmd::Resolve {
            network,
            alias,
            json,
        } => networks::resolve(api, network, alias, json).await?,
        NetworkCmd::Test {
            network,
            source,
            target,
            json,
        } => {
            let passed = networks::test(api, network, source, target, json).await?;
            return Ok(if passed { 0 } else { 1 });
        }
    }
    Ok(0)
}

async fn sandbox(api: &mut client::Api, cmd: SandboxCmd) -> anyhow::Result<i32> {
    use sandboxes::Action;
    match cmd {
        SandboxCmd::Create(create) => {
            let SandboxCreateCmd {
                cluster_id,
                host_id,
                tags,
                traits,
                image,
                blueprint,
                repo_url,
                repo_branch,
                repo_path,
                volumes,
                name,
                memory,
                cpus,
                json,
            } = *create;
            let args = sandboxes::CreateArgs {
                cluster_id,
                host_id,
                tags,
                traits,
                image,
                blueprint,
                repo_url,
                repo_branch,
                repo_path,
                volumes,
                name,
                memory_mib: memory,
                cpus,
            };
            sandboxes::create(api, args, json).await
        }
        SandboxCmd::List {
            cluster,
            host,
            live,
            json,
        } => sandboxes::list(api, cluster, host, live, json)
            .await
            .map(|()| 0),
        SandboxCmd::Show { id, json } => sandboxes::show(api, id, json).await.map(|()| 0),
        SandboxCmd::Start { id, json } => sandboxes::act(api, Action::Start, id, json).await,
        SandboxCmd::Stop { id, json } => sandboxes::act(api, Action::Stop, id, json).await,
        SandboxCmd::Reprovision { id, json } => {
            sandboxes::act(api, Action::Reprovision, id, json).await
        }
        SandboxCmd::Deprovision { id, json } => {
            sandboxes::act(api, Action::Deprovision, id, json).await
        }
        SandboxCmd::Logs { id, follow, tail } => {
            sandbox_io::logs(api, id, follow, tail.unwrap_or(0)).await
        }
        SandboxCmd::Terminal {
            id,
            max_duration,
            command,
        } => {
            terminal::run(
                api,
                terminal::Target::Sandbox(id),
                String::new(),
                command,
                max_duration,
            )
            .await
        }
        SandboxCmd::Files(SandboxFilesCmd::Ls { id, path, json }) => {
            sandbox_io::list(api, id, path, json).await
        }
        SandboxCmd::Files(SandboxFilesCmd::Get { id, path, local }) => {
            sandbox_io::get(api, id, path, local).await
        }
        SandboxCmd::Files(SandboxFilesCmd::Put { id, path, local }) => {
            sandbox_io::put(api, id, path, local).await
        }
    }
}

/// Checks the URL, token and certificate with a real call, then saves them.
async fn login(url: String, token: Option<String>, ca: PathBuf) -> anyhow::Result<()> {
    let token = match token.or_else(|| std::env::var(config::API_TOKEN).ok()) {
        Some(token) if !token.trim().is_empty() => token.trim().to_owned(),
        _ => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the operator token from stdin")?;
            let line = line.trim().to_owned();
            anyhow::ensure!(
                !line.is_empty(),
                "no operator token: give --token, set {}, or type it on stdin",
                config::API_TOKEN
            );
            line
        }
    };
    let ca_pem = config::read_ca_file(&ca)?;
    let resolved = config::Resolved {
        url: url.clone(),
        token: token.clone(),
        ca_pem: ca_pem.clone(),
    };
    let mut api = client::connect(&resolved).await?;
    api.list_clusters(proto::ListClustersRequest {})
        .await
        .map_err(client::status_error)?;
    let path = config::config_path()?;
    config::write_file(
        &path,
        &config::FileConfig {
            url: Some(url.clone()),
            token: Some(token),
            ca_pem: Some(String::from_utf8(ca_pem).context("CA file is not UTF-8 PEM")?),
        },
    )?;
    println!(
        "logged in to {url}; saved to {} (mode 0600)",
        path.display()
    );
    Ok(())
}
