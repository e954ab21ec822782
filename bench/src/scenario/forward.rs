//! `gstacks-bench forward`: the laptop path of `gstacks mesh forward`
//! (issue 8) beside direct loopback TCP, in the same run.
//!
//! Set up with real parts: the control plane in this process (so the bench
//! can register a sandbox record), a real `gstacks-agent` process, the
//! `gstacks` CLI (`mesh join`, then `mesh forward` as a child process), and
//! the workload service on 127.0.0.1 standing in for the sandbox. The
//! measured path: client -> 127.0.0.1:<local> (the forwarder) -> its
//! userspace mesh node -> the agent's overlay port 4180 (policy, `local`)
//! -> the service. The baseline: the client straight to the service.
//!
//! Issue 8's target is "the same ratios as the agent proxy path". The
//! table checks it two ways:
//! - issue 6's ratios applied to the forwarder: throughput at least 0.8x
//!   the raw mesh's (two `MeshNode`s in this process, rows with scenario
//!   `netstack`), p50 round trip at most 1.5x loopback's + 150 us;
//! - beside the proxy path itself (`gstacks-bench proxy`'s setup: agents A
//!   and B, rows with scenario `proxy`) against the same service: each
//!   path's ratio to loopback, held when the forwarder's is at least 0.9x
//!   the proxy's for throughput and at most 1.1x for round trips.
//!
//! All four paths are up together; each round measures one metric through
//! the four paths back to back, then the next metric, `--rounds` times
//! (default 5); each figure is the median of its rounds.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::netstack::{self, kernel_dialer, RawMesh};
use super::proxy::{self, ProxyPath};
use super::support::{self, free_port, sibling, wait_for, Guard, SETUP};
use crate::results::{Metric, Results, System};
use crate::workload::{self, Dialer};

pub const SCENARIO: &str = "forward";
pub const METRICS: [Metric; 4] = [
    Metric::ThroughputUp,
    Metric::ThroughputDown,
    Metric::RttP50,
    Metric::RttP99,
];
const RTT_SIZE: usize = 64;
const RTT_WARMUP: usize = 200;
const RTT_COUNT: usize = 5_000;
const NETWORK: &str = "bench";
const ALIAS: &str = "svc";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds per throughput measurement.
    #[arg(long, value_name = "SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
    /// Times each path is measured, in turn; each figure is the median.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=15))]
    pub rounds: u32,
}

/// What one step of a round measures through every path in turn.
#[derive(Debug, Clone, Copy)]
enum Step {
    Up,
    Down,
    RoundTrips,
}

impl Step {
    const ALL: [Step; 3] = [Step::Up, Step::Down, Step::RoundTrips];

    /// This step's figures through `dial`: one throughput, or the p50 and
    /// p99 of 64-byte round trips.
    async fn measure(
        self,
        name: &str,
        dial: &Dialer,
        seconds: Duration,
    ) -> Vec<(Metric, Result<f64, String>)> {
        let deadline = seconds * 4 + Duration::from_secs(30);
        let timed = |r: Result<std::io::Result<f64>, tokio::time::error::Elapsed>| match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no result within {deadline:?}")),
        };
        match self {
            Step::Up => {
                eprintln!("forward:   {name} throughput up");
                let up = tokio::time::timeout(deadline, workload::throughput_up(dial, seconds));
                vec![(Metric::ThroughputUp, timed(up.await))]
            }
            Step::Down => {
                eprintln!("forward:   {name} throughput down");
                let down = tokio::time::timeout(deadline, workload::throughput_down(dial, seconds));
                vec![(Metric::ThroughputDown, timed(down.await))]
            }
            Step::RoundTrips => {
                eprintln!("forward:   {name} round trips");
                let rtt = match tokio::time::timeout(
                    Duration::from_secs(120),
                    workload::round_trips(dial, RTT_SIZE, RTT_WARMUP, RTT_COUNT),
                )
                .await
                {
                    Ok(Ok(pair)) => Ok(pair),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no result within 120 s".to_owned()),
                };
                vec![
                    (Metric::RttP50, rtt.clone().map(|(p50, _)| p50)),
                    (Metric::RttP99, rtt.map(|(_, p99)| p99)),
                ]
            }
        }
    }
}

/// A path (loopback, the raw mesh, the forwarder, the proxy path)
/// measured in each round.
struct Route {
    scenario: &'static str,
    system: System,
    dial: Dialer,
}

/// Runs the scenario: everything is brought up, then each round measures
/// upload, download and round trips, each through loopback, the raw mesh,
/// the forwarder and the proxy path back to back; each figure is the median of its
/// `--rounds` rounds (the machine's noise moves single runs by 15%).
pub fn run(options: &Options) -> Result<Results> {
    netstack::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build tokio runtime")?;
    runtime.block_on(run_async(options))
}

/// Issue 6's ratios, applied to the forwarder's figures.
pub fn issue6_verdicts(results: &Results) -> Vec<proxy::Verdict> {
    proxy::path_targets(SCENARIO)
        .into_iter()
        .map(|(metric, bound)| {
            let ours = results.get(SCENARIO, System::Gstacks, metric);
            proxy::evaluate_figure(results, metric, ours, bound)
        })
        .collect()
}

async fn run_async(options: &Options) -> Result<Results> {
    let mut results = Results::default();
    let seconds = Duration::from_secs(options.seconds);
    let work = tempfile::tempdir().context("create a temporary directory")?;

    // The service standing in for the sandbox.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let service = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(workload::serve(stream));
        }
    });

    let mut paths = vec![Route {
        scenario: SCENARIO,
        system: System::Loopback,
        dial: kernel_dialer(service, None),
    }];
    // The raw mesh in this process, for issue 6's throughput ratio.
    let mesh = match RawMesh::start(Vec::new()).await {
        Ok(mesh) => {
            paths.push(Route {
                scenario: netstack::SCENARIO,
                system: System::Gstacks,
                dial: mesh.dial.clone(),
            });
            Some(mesh)
        }
        Err(e) => {
            results.unavailable(netstack::SCENARIO, System::Gstacks, None, format!("{e:#}"));
            None
        }
    };
    eprintln!("forward: gstacks mesh forward (control plane, agent, join)");
    let _forwarder = match forwarder(&work.path().join("forward"), service).await {
        Ok((local, children, control)) => {
            paths.push(Route {
                scenario: SCENARIO,
                system: System::Gstacks,
                dial: kernel_dialer(local, None),
            });
            Some((children, control))
        }
        Err(e) => {
            results.unavailable(SCENARIO, System::Gstacks, None, format!("{e:#}"));
            None
        }
    };
    eprintln!("forward: the agent proxy path (control plane, agents A and B)");
    let _proxy = match ProxyPath::start(&work.path().join("proxy"), service).await {
        Ok(path) => {
            paths.push(Route {
                scenario: proxy::SCENARIO,
                system: System::Gstacks,
                dial: path.dialer(),
            });
            Some(path)
        }
        Err(e) => {
            results.unavailable(proxy::SCENARIO, System::Gstacks, None, format!("{e:#}"));
            None
        }
    };
    // Each step goes through every path back to back, so that the paths
    // of one round see the same moment of a noisy machine.
    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        let mut measured = Results::default();
        for step in Step::ALL {
            for path in &paths {
                let name = format!(
                    "{} {} (round {round}/{})",
                    path.scenario,
                    path.system.name(),
                    options.rounds
                );
                for (metric, figure) in step.measure(&name, &path.dial, seconds).await {
                    match figure {
                        Ok(v) => measured.record(path.scenario, path.system, metric, v),
                        Err(why) => {
                            measured.unavailable(path.scenario, path.system, Some(metric), why)
                        }
                    }
                }
            }
        }
        rounds.push(measured);
    }
    results.extend(Results::medians(rounds));
    if let Some(mesh) = mesh {
        mesh.node_a.shutdown().await;
        mesh.node_b.shutdown().await;
    }
    Ok(results)
}

/// For a metric, this run's ratio to loopback of the forward path and of
/// the proxy path, and whether the forward one is as good (within 10%).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub metric: Metric,
    pub forward: Option<f64>,
    pub proxy: Option<f64>,
    /// `None` when a figure is missing.
    pub held: Option<bool>,
}

/// Issue 8's target for each metric, from the figures of one run.
pub fn comparisons(results: &Results) -> Vec<Comparison> {
    METRICS
        .iter()
        .map(|&metric| {
            let loopback = results
                .get(SCENARIO, System::Loopback, metric)
                .filter(|v| *v > 0.0);
            let ratio = |scenario| {
                let ours = results.get(scenario, System::Gstacks, metric)?;
                Some(ours / loopback?)
            };
            let (forward, proxy) = (ratio(SCENARIO), ratio(proxy::SCENARIO));
            let higher_is_better = matches!(metric, Metric::ThroughputUp | Metric::ThroughputDown);
            let held = match (forward, proxy) {
                (Some(f), Some(p)) if higher_is_better => Some(f >= 0.9 * p),
                (Some(f), Some(p)) => Some(f <= 1.1 * p),
                _ => None,
            };
            Comparison {
                metric,
                forward,
                proxy,
                held,
            }
        })
        .collect()
}

/// The table for people: both paths, loopback and the raw mesh, each
/// path's ratio to loopback, and both readings of the target.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>9} {:>9} {:>9} {:>9}   {:>8} {:>8}   {:<44} vs proxy ratio",
        "metric",
        "unit",
        "forward",
        "proxy",
        "loopback",
        "netstack",
        "fwd/lo",
        "proxy/lo",
        "issue 6's ratios",
    );
    let cell = |v: Option<f64>| match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "n/a".to_owned(),
    };
    let times = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}x"));
    let issue6 = issue6_verdicts(results);
    for c in comparisons(results) {
        let outcome = match c.held {
            Some(true) => "held",
            Some(false) => "missed",
            None => "not measured",
        };
        let ratios = issue6
            .iter()
            .find(|v| v.metric == c.metric)
            .map_or("no target".to_owned(), |v| {
                format!("{}: {}", v.target, v.outcome())
            });
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>9} {:>9} {:>9} {:>9}   {:>8} {:>8}   {:<44} {outcome}",
            c.metric.name(),
            c.metric.unit(),
            cell(results.get(SCENARIO, System::Gstacks, c.metric)),
            cell(results.get(proxy::SCENARIO, System::Gstacks, c.metric)),
            cell(results.get(SCENARIO, System::Loopback, c.metric)),
            cell(results.get(netstack::SCENARIO, System::Gstacks, c.metric)),
            times(c.forward),
            times(c.proxy),
            ratios,
        );
    }
    results.write_unavailable(&mut out, None);
    out
}

/// Brings up control plane, agent, join and `mesh forward`; the local
/// address of the forwarder and what keeps it alive.
async fn forwarder(
    dir: &Path,
    service: SocketAddr,
) -> Result<(SocketAddr, Vec<Guard>, control::server::Running)> {
    use control::store::PolicyRule;

    let running = support::start_control(&dir.join("control")).await?;
    let plane = running.plane.clone();
    let operator = running
        .first_operator_token
        .as_ref()
        .context("no first operator token")?
        .secret
        .expose()
        .to_owned();
    let token = plane.create_mesh_api_token("gstacks-bench forward")?;
    plane.mesh.set(control::mesh::MeshSettings {
        control_url: Some(running.url()),
        api_url: Some(running.url()),
        api_token: Some(token.secret.expose().to_owned()),
        ..Default::default()
    });
    let ca = running.tls.cert_path.clone();
    let now = control::clock::now_ms();
    plane.store.create_network(NETWORK, now)?;

    let (agent, host_id) = support::start_agent(
        &running,
        &dir.join("agent"),
        &support::loopback_agent_env(std::net::Ipv4Addr::LOCALHOST)?,
    )
    .await?;
    support::insert_sandbox(&plane, "sbx_bench", &host_id, service.ip())?;
    plane
        .store
        .attach_sandbox(NETWORK, "sbx_bench", Some((ALIAS, &[service.port()])), now)?;
    plane.store.add_policy_rule(&PolicyRule {
        id: "pol_bench".to_owned(),
        network: NETWORK.to_owned(),
        from: "local".to_owned(),
        to: ALIAS.to_owned(),
        port: 0,
        created_at_ms: now,
    })?;

    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let cli = sibling("gstacks")?;
    let command = |args: &[&str]| {
        let mut c = Command::new(&cli);
        c.args(args)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env("GLOBALSTACKS_API_URL", running.url())
            .env("GLOBALSTACKS_API_TOKEN", &operator)
            .env("GLOBALSTACKS_API_CA_FILE", &ca)
            .stdin(Stdio::null());
        c
    };
    let mut join = command(&["mesh", "join", NETWORK, "--ttl", "1h"]);
    let out = tokio::task::spawn_blocking(move || join.output()).await??;
    if !out.status.success() {
        bail!(
            "gstacks mesh join: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let local = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
    let target = format!("{ALIAS}:{}", service.port());
    let local_port = local.port().to_string();
    let mut forward = command(&["mesh", "forward", NETWORK, &target, "--local", &local_port]);
    let mut child = forward
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start gstacks mesh forward")?;
    let stdout = child.stdout.take().context("forwarder stdout")?;
    let forwarder = Guard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Ctrl-C stops") {
                let _ = tx.send(());
            }
        }
    });
    wait_for("gstacks mesh forward ready", || rx.try_recv().ok()).await?;
    // The first connection waits for the WireGuard handshake; open one so
    // the measurements start on an established session.
    let dial = kernel_dialer(local, None);
    let deadline = Instant::now() + SETUP;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), workload::open_held(&dial)).await {
            Ok(Ok(_held)) => break,
            _ if Instant::now() > deadline => bail!("no connection through the forwarder"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok((local, vec![forwarder, agent], running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forward_ratio_is_held_against_the_proxy_ratio_of_the_run() {
        let mut r = Results::default();
        let mut put = |scenario, system, metric, v| r.record(scenario, system, metric, v);
        put(SCENARIO, System::Loopback, Metric::ThroughputUp, 10_000.0);
        put(SCENARIO, System::Gstacks, Metric::ThroughputUp, 1_000.0);
        put(
            proxy::SCENARIO,
            System::Gstacks,
            Metric::ThroughputUp,
            1_050.0,
        );
        put(SCENARIO, System::Loopback, Metric::ThroughputDown, 10_000.0);
        put(SCENARIO, System::Gstacks, Metric::ThroughputDown, 800.0);
        put(
            proxy::SCENARIO,
            System::Gstacks,
            Metric::ThroughputDown,
            1_000.0,
        );
        put(SCENARIO, System::Loopback, Metric::RttP50, 20.0);
        put(SCENARIO, System::Gstacks, Metric::RttP50, 150.0);
        put(proxy::SCENARIO, System::Gstacks, Metric::RttP50, 180.0);
        let held: Vec<Option<bool>> = comparisons(&r).iter().map(|c| c.held).collect();
        // 0.10 >= 0.9 x 0.105; 0.08 < 0.9 x 0.10; 7.5 <= 1.1 x 9; p99 missing.
        assert_eq!(held, [Some(true), Some(false), Some(true), None]);
        // Issue 6's ratios: the raw mesh is missing, p50 150 <= 1.5 x 20 + 150.
        let issue6: Vec<Option<bool>> = issue6_verdicts(&r).iter().map(|v| v.held).collect();
        assert_eq!(issue6, [None, None, Some(true)]);
        r.record(
            netstack::SCENARIO,
            System::Gstacks,
            Metric::ThroughputUp,
            1_200.0,
        );
        r.record(
            netstack::SCENARIO,
            System::Gstacks,
            Metric::ThroughputDown,
            1_200.0,
        );
        let issue6: Vec<Option<bool>> = issue6_verdicts(&r).iter().map(|v| v.held).collect();
        // 1000 >= 0.8 x 1200; 800 < 960.
        assert_eq!(issue6, [Some(true), Some(false), Some(true)]);
        let table = table(&r);
        assert!(table.contains("0.10x"), "{table}");
        assert!(table.contains("not measured"), "{table}");
        assert!(
            table.contains("<= 1.5x forward/loopback + 150 = 180: held"),
            "{table}"
        );
    }
}
