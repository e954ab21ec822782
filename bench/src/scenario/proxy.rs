//! `gstacks-bench proxy`: the `agent_proxy` path of issue 6 with real
//! parts, beside direct loopback TCP and the raw mesh, all in one run, plus
//! the agent DNS beside dnsmasq and the policy decision rate.
//!
//! The path: a client bound to the address of sandbox `sbx_client` (a
//! record on agent A) -> agent A's alias listener -> policy -> mesh (the
//! agents' userspace WireGuard nodes) -> agent B -> policy -> the workload
//! service, the runtime address of sandbox `sbx_server` on agent B. The
//! control plane runs in this process (to register the sandbox records);
//! A and B are real `gstacks-agent` processes. Systems and scenarios in the
//! same JSON file:
//! - scenario `proxy`, system `gstacks`: the path above; `loopback`: the
//!   client straight to the service; `rss_10k_idle` of `gstacks` is the sum
//!   of both agents' resident sets while 10,000 idle connections pass
//!   through them (the `hold-idle` child dials them).
//! - scenario `netstack`, system `gstacks`: the raw mesh (two `MeshNode`s in
//!   one process), measured by the `netstack` scenario's code in this run.
//! - scenario `dns`: the `dns` scenario's rows (agent DNS beside dnsmasq).
//! - metric `policy_decisions_per_s`: explained decisions through the
//!   agent's rule index (`policy::RuleSet::decide`) against the 50-rule
//!   sample network (`policy::sample`), timed in this process; the linear
//!   scan's rate is printed beside it, and `cargo bench -p policy` has the
//!   detailed figures.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::dns;
use super::netstack::{self, hold_idle_rss, kernel_dialer, own_command, record_rss, RssOf};
use super::support::{self, Guard, SETUP};
use crate::results::{Metric, Results, System};
use crate::workload;

pub const SCENARIO: &str = "proxy";
/// The rows of the table, in order.
pub const METRICS: [Metric; 8] = [
    Metric::ThroughputUp,
    Metric::ThroughputDown,
    Metric::RttP50,
    Metric::RttP99,
    Metric::ConnectRate,
    Metric::Rss10kIdle,
    Metric::DnsQps,
    Metric::PolicyDecisionsPerS,
];
const NETWORK: &str = "bench";
const ALIAS: &str = "svc";
/// Distinct loopback addresses, so that this run meets no test's listeners.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 91, 5);
const PROXY_A: Ipv4Addr = Ipv4Addr::new(127, 0, 91, 1);
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 92, 5);
const PROXY_B: Ipv4Addr = Ipv4Addr::new(127, 0, 92, 1);
/// The agents' connection limits for this run (10,000 idle plus margin).
const CONNECTION_LIMIT: usize = 12_000;
const POLICY_RULES: usize = 50;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds per throughput measurement (proxy, loopback and netstack).
    #[arg(long, value_name = "SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
    /// Seconds of dnsperf per DNS system.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub dns_seconds: u64,
    /// Times the raw mesh, loopback and the proxy path are measured, in
    /// turn; each of their figures is the median of its rounds.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=15))]
    pub rounds: u32,
}

/// Runs everything in turn: policy, DNS, then `--rounds` rounds of the
/// raw mesh, loopback and the proxy path.
pub fn run(options: &Options) -> Result<Results> {
    netstack::raise_fd_limit();
    let mut results = Results::default();
    let seconds = Duration::from_secs(options.seconds);

    eprintln!("proxy: policy decisions");
    let rate = policy_rate(Duration::from_secs(1));
    results.record(SCENARIO, System::Gstacks, Metric::PolicyDecisionsPerS, rate);

    // DNS before the runs that open tens of thousands of TCP connections:
    // dnsmasq also listens on TCP on its port, which a local port left in
    // TIME_WAIT makes unavailable ("Address already in use").
    eprintln!("proxy: dns");
    let dns_options = dns::Options {
        json: None,
        seconds: options.dns_seconds,
        clients: 8,
    };
    match dns::run(&dns_options) {
        Ok(dns) => results.extend(dns),
        Err(e) => results.unavailable(dns::SCENARIO, System::Gstacks, None, format!("{e:#}")),
    }

    // Single runs of these moved by 15-30% on a quiet machine (another
    // process waking at the wrong moment): every round brings the three
    // paths up afresh and measures them, and the medians count.
    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        eprintln!("proxy: round {round}/{}", options.rounds);
        let mut measured = Results::default();
        netstack::run_mesh(seconds, &mut measured);
        let work = tempfile::tempdir().context("create a temporary directory")?;
        if let Err(e) = proxy_and_loopback(seconds, work.path(), &mut measured) {
            measured.unavailable(SCENARIO, System::Gstacks, None, format!("{e:#}"));
        }
        rounds.push(measured);
    }
    results.extend(Results::medians(rounds));

    Ok(results)
}

/// Explained decisions per second against the sample network, the four
/// connections of `policy::sample::queries` in turn, for `duration` each:
/// through the agent's index, and (printed as the baseline) by the linear
/// scan over the rule list.
fn policy_rate(duration: Duration) -> f64 {
    let rules = policy::sample::rules(POLICY_RULES);
    let set = policy::RuleSet::new(rules.clone());
    let queries = policy::sample::queries(POLICY_RULES);
    let indexed = decisions_per_s(duration, &queries, |q| {
        black_box(&set).decide(black_box(&q.source), black_box(q.destination()))
    });
    let linear = decisions_per_s(duration, &queries, |q| {
        policy::decide(
            black_box(&rules),
            black_box(&q.source),
            black_box(q.destination()),
        )
    });
    eprintln!(
        "proxy: policy {:.2}M decisions/s through the index, {:.2}M by the linear scan ({:.2}x)",
        indexed / 1e6,
        linear / 1e6,
        indexed / linear
    );
    indexed
}

fn decisions_per_s(
    duration: Duration,
    queries: &[policy::sample::Query],
    decide: impl Fn(&policy::sample::Query) -> policy::Decision,
) -> f64 {
    let start = Instant::now();
    let mut decisions: u64 = 0;
    while start.elapsed() < duration {
        for _ in 0..1_000 {
            for query in queries {
                black_box(decide(query));
            }
        }
        decisions += 1_000 * queries.len() as u64;
    }
    decisions as f64 / start.elapsed().as_secs_f64()
}

/// Loopback first, then the proxied path, against the same service.
fn proxy_and_loopback(seconds: Duration, work: &Path, results: &mut Results) -> Result<()> {
    let runtime = netstack::runtime()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((SERVICE_IP, 0)))
        .with_context(|| format!("bind the service on {SERVICE_IP}"))?;
    let service = listener.local_addr()?;
    runtime.spawn(netstack::serve_kernel(listener));

    eprintln!("proxy: loopback");
    let direct = kernel_dialer(service, None);
    netstack::measure(
        &runtime,
        SCENARIO,
        System::Loopback,
        &direct,
        seconds,
        results,
    );
    let rss = hold_idle_rss(own_command(&["--tcp", &service.to_string()]), RssOf::Child);
    record_rss(SCENARIO, System::Loopback, rss, results);

    eprintln!("proxy: gstacks (control plane, agents A and B)");
    let path = runtime.block_on(ProxyPath::start(work, service))?;
    let dial = path.dialer();
    netstack::measure(&runtime, SCENARIO, System::Gstacks, &dial, seconds, results);
    let before: Result<f64> = path.agents.iter().map(|a| netstack::rss_mib(a.pid())).sum();
    if let Ok(mib) = before {
        eprintln!("proxy:   agents A + B before the idle connections: {mib:.1} MiB");
    }
    let rss = hold_idle_rss(
        own_command(&[
            "--tcp",
            &path.listener.to_string(),
            "--bind",
            &CLIENT_IP.to_string(),
        ]),
        RssOf::Pids(path.agents.iter().map(Guard::pid).collect()),
    );
    record_rss(SCENARIO, System::Gstacks, rss, results);
    drop(path);
    Ok(())
}

/// The proxied path, up: what keeps it alive and where the client dials.
pub(super) struct ProxyPath {
    listener: SocketAddr,
    agents: Vec<Guard>,
    _control: control::server::Running,
}

impl ProxyPath {
    /// How a client reaches `service` through the path: from the address
    /// of sandbox `sbx_client` to agent A's alias listener.
    pub(super) fn dialer(&self) -> workload::Dialer {
        kernel_dialer(self.listener, Some(IpAddr::V4(CLIENT_IP)))
    }

    /// Control plane, agents A and B, the two sandbox records and the rule;
    /// returns once a connection has gone all the way to `service`.
    pub(super) async fn start(dir: &Path, service: SocketAddr) -> Result<ProxyPath> {
        let running = support::start_control(&dir.join("control")).await?;
        let plane = running.plane.clone();
        let limit = CONNECTION_LIMIT.to_string();
        let env = |proxy_ip| -> Result<Vec<(&'static str, String)>> {
            let mut env = support::loopback_agent_env(proxy_ip)?;
            env.push((
                "GLOBALSTACKS_AGENT_MESH_MAX_LISTENER_CONNECTIONS",
                limit.clone(),
            ));
            env.push((
                "GLOBALSTACKS_AGENT_MESH_MAX_MESH_CONNECTIONS",
                limit.clone(),
            ));
            Ok(env)
        };
        let (agent_a, host_a) =
            support::start_agent(&running, &dir.join("agent-a"), &env(PROXY_A)?).await?;
        let (agent_b, host_b) =
            support::start_agent(&running, &dir.join("agent-b"), &env(PROXY_B)?).await?;

        let now = control::clock::now_ms();
        plane.store.create_network(NETWORK, now)?;
        support::insert_sandbox(&plane, "sbx_client", &host_a, IpAddr::V4(CLIENT_IP))?;
        support::insert_sandbox(&plane, "sbx_server", &host_b, service.ip())?;
        plane
            .store
            .attach_sandbox(NETWORK, "sbx_client", None, now)?;
        plane
            .store
            .attach_sandbox(NETWORK, "sbx_server", Some((ALIAS, &[service.port()])), now)?;
        plane.store.add_policy_rule(&control::store::PolicyRule {
            id: "pol_bench".to_owned(),
            network: NETWORK.to_owned(),
            from: "sandbox:sbx_client".to_owned(),
            to: ALIAS.to_owned(),
            port: 0,
            created_at_ms: now,
        })?;

        // Ready once a connection goes all the way (netmaps applied, the
        // listener bound, the WireGuard handshake done).
        let listener = SocketAddr::new(IpAddr::V4(PROXY_A), service.port());
        let dial = kernel_dialer(listener, Some(IpAddr::V4(CLIENT_IP)));
        let deadline = Instant::now() + SETUP;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), workload::open_held(&dial)).await {
                Ok(Ok(_held)) => break,
                _ if Instant::now() > deadline => bail!(
                    "no connection through agent A's listener {listener} within {SETUP:?} (agent logs: {})",
                    dir.display()
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(ProxyPath {
            listener,
            agents: vec![agent_a, agent_b],
            _control: running,
        })
    }
}

/// A target of issue 6, checked against the figures of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Bound {
    /// At least `ratio` x the baseline `(scenario, system)`.
    MinTimes(&'static str, System, f64),
    /// At most `ratio` x the baseline plus `plus`.
    MaxTimesPlus(&'static str, System, f64, f64),
    Max(f64),
    Min(f64),
}

/// Issue 6's targets for a data path whose loopback baseline has
/// scenario `loopback`: throughput against the raw mesh, p50 against
/// loopback. `gstacks-bench forward` applies them to the forwarder.
pub(super) const fn path_targets(loopback: &'static str) -> [(Metric, Bound); 3] {
    [
        (
            Metric::ThroughputUp,
            Bound::MinTimes(netstack::SCENARIO, System::Gstacks, 0.8),
        ),
        (
            Metric::ThroughputDown,
            Bound::MinTimes(netstack::SCENARIO, System::Gstacks, 0.8),
        ),
        (
            Metric::RttP50,
            Bound::MaxTimesPlus(loopback, System::Loopback, 1.5, 150.0),
        ),
    ]
}

/// Issue 6's other targets.
const OTHER_TARGETS: [(Metric, Bound); 3] = [
    (Metric::Rss10kIdle, Bound::Max(200.0)),
    (
        Metric::DnsQps,
        Bound::MinTimes(dns::SCENARIO, System::Dnsmasq, 0.8),
    ),
    (Metric::PolicyDecisionsPerS, Bound::Min(10e6)),
];

/// Our figure of `metric` in this run: the proxy path's, or the agent DNS's.
fn ours(results: &Results, metric: Metric) -> Option<f64> {
    let scenario = if metric == Metric::DnsQps {
        dns::SCENARIO
    } else {
        SCENARIO
    };
    results.get(scenario, System::Gstacks, metric)
}

/// How one target fared: its text with the limit of this run, and whether
/// it held (`None` when a figure is missing).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub metric: Metric,
    pub target: String,
    pub held: Option<bool>,
}

impl Verdict {
    pub(super) fn outcome(&self) -> &'static str {
        match self.held {
            Some(true) => "held",
            Some(false) => "missed",
            None => "not measured",
        }
    }
}

fn evaluate(results: &Results, metric: Metric, bound: Bound) -> Verdict {
    evaluate_figure(results, metric, ours(results, metric), bound)
}

/// `ours`, a figure of `metric`, against `bound` and the baselines in
/// `results`.
pub(super) fn evaluate_figure(
    results: &Results,
    metric: Metric,
    ours: Option<f64>,
    bound: Bound,
) -> Verdict {
    let (target, limit, at_least) = match bound {
        Bound::MinTimes(scenario, system, ratio) => {
            let limit = results.get(scenario, system, metric).map(|b| b * ratio);
            (
                format!(">= {ratio}x {scenario}/{}", system.name()),
                limit,
                true,
            )
        }
        Bound::MaxTimesPlus(scenario, system, ratio, plus) => {
            let limit = results
                .get(scenario, system, metric)
                .map(|b| b * ratio + plus);
            (
                format!("<= {ratio}x {scenario}/{} + {plus}", system.name()),
                limit,
                false,
            )
        }
        Bound::Max(limit) => (format!("<= {limit}"), Some(limit), false),
        Bound::Min(limit) => (format!(">= {limit:e}"), Some(limit), true),
    };
    let target = match limit {
        Some(limit) if !matches!(bound, Bound::Max(_) | Bound::Min(_)) => {
            format!("{target} = {}", cell(limit))
        }
        _ => target,
    };
    let held = match (ours, limit) {
        (Some(v), Some(limit)) if at_least => Some(v >= limit),
        (Some(v), Some(limit)) => Some(v <= limit),
        _ => None,
    };
    Verdict {
        metric,
        target,
        held,
    }
}

/// Every target of issue 6 against the figures of this run.
pub fn verdicts(results: &Results) -> Vec<Verdict> {
    path_targets(SCENARIO)
        .iter()
        .chain(&OTHER_TARGETS)
        .map(|&(metric, bound)| evaluate(results, metric, bound))
        .collect()
}

fn cell(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The table for people: our figure, the baselines of the same run, ratios,
/// and each target with held or missed.
pub fn table(results: &Results) -> String {
    let verdicts = verdicts(results);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<23} {:>7} {:>10} {:>10} {:>10} {:>10}   {:<34} target",
        "metric", "unit", "gstacks", "loopback", "netstack", "dnsmasq", "ratios"
    );
    for metric in METRICS {
        let show = |v: Option<f64>| v.map_or("n/a".to_owned(), cell);
        let value = ours(results, metric);
        let loopback = results.get(SCENARIO, System::Loopback, metric);
        let mesh = results.get(netstack::SCENARIO, System::Gstacks, metric);
        let dnsmasq = results.get(dns::SCENARIO, System::Dnsmasq, metric);
        let mut ratios = Vec::new();
        if let Some(v) = value {
            for (name, base) in [
                ("netstack", mesh),
                ("loopback", loopback),
                ("dnsmasq", dnsmasq),
            ] {
                if let Some(b) = base.filter(|b| *b > 0.0) {
                    ratios.push(format!("{:.2}x {name}", v / b));
                }
            }
        }
        let target = verdicts
            .iter()
            .find(|v| v.metric == metric)
            .map_or(String::new(), |v| format!("{}: {}", v.target, v.outcome()));
        let _ = writeln!(
            out,
            "{:<23} {:>7} {:>10} {:>10} {:>10} {:>10}   {:<34} {target}",
            metric.name(),
            metric.unit(),
            show(value),
            show(loopback),
            show(mesh),
            show(dnsmasq),
            ratios.join(", "),
        );
    }
    results.write_unavailable(&mut out, None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Results {
        let mut r = Results::default();
        r.record(SCENARIO, System::Gstacks, Metric::ThroughputUp, 4000.0);
        r.record(
            netstack::SCENARIO,
            System::Gstacks,
            Metric::ThroughputUp,
            4800.0,
        );
        r.record(SCENARIO, System::Gstacks, Metric::ThroughputDown, 3000.0);
        r.record(
            netstack::SCENARIO,
            System::Gstacks,
            Metric::ThroughputDown,
            4800.0,
        );
        r.record(SCENARIO, System::Gstacks, Metric::RttP50, 190.0);
        r.record(SCENARIO, System::Loopback, Metric::RttP50, 20.0);
        r.record(SCENARIO, System::Gstacks, Metric::Rss10kIdle, 250.0);
        r.record(dns::SCENARIO, System::Gstacks, Metric::DnsQps, 120_000.0);
        r.record(dns::SCENARIO, System::Dnsmasq, Metric::DnsQps, 128_000.0);
        r
    }

    fn held(verdicts: &[Verdict], metric: Metric) -> Option<bool> {
        verdicts.iter().find(|v| v.metric == metric).unwrap().held
    }

    #[test]
    fn targets_are_checked_against_the_baselines_of_the_run() {
        let v = verdicts(&figures());
        // 4000 >= 0.8 x 4800 = 3840; 3000 < 3840.
        assert_eq!(held(&v, Metric::ThroughputUp), Some(true));
        assert_eq!(held(&v, Metric::ThroughputDown), Some(false));
        // 190 > 1.5 x 20 + 150 = 180.
        assert_eq!(held(&v, Metric::RttP50), Some(false));
        assert_eq!(held(&v, Metric::Rss10kIdle), Some(false));
        // 120k >= 0.8 x 128k.
        assert_eq!(held(&v, Metric::DnsQps), Some(true));
        // Not measured: neither held nor missed.
        assert_eq!(held(&v, Metric::PolicyDecisionsPerS), None);
        let rtt = v.iter().find(|v| v.metric == Metric::RttP50).unwrap();
        assert_eq!(rtt.target, "<= 1.5x proxy/loopback + 150 = 180");
    }

    #[test]
    fn the_table_shows_ratios_targets_and_gaps() {
        let mut r = figures();
        r.record(SCENARIO, System::Gstacks, Metric::PolicyDecisionsPerS, 12e6);
        r.unavailable(dns::SCENARIO, System::Dnsmasq, None, "not installed");
        let table = table(&r);
        assert!(table.contains("0.83x netstack"), "{table}");
        assert!(table.contains("0.94x dnsmasq"), "{table}");
        assert!(table.contains(">= 1e7: held"), "{table}");
        assert!(table.contains(": missed"), "{table}");
        assert!(table.contains("12.00M"), "{table}");
        assert!(
            table.contains("unavailable: dns dnsmasq all metrics: not installed"),
            "{table}"
        );
    }

    #[test]
    fn the_policy_rate_is_counted() {
        assert!(policy_rate(Duration::from_millis(20)) > 0.0);
    }
}
