//! `gstacks-bench dns`: queries per second of the agent DNS answering one
//! `.gstacks` record, beside dnsmasq (Debian's `dnsmasq-base`) answering the
//! same record, in the same run, both driven by dnsperf (Debian's `dnsperf`)
//! over UDP on loopback.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::results::{Metric, Results, System};

pub const SCENARIO: &str = "dns";
const NAME: &str = "api.dev.gstacks";
const ANSWER: &str = "127.77.0.5";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds of dnsperf per system.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub seconds: u64,
    /// dnsperf clients (sockets).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub clients: u64,
}

pub fn run(options: &Options) -> anyhow::Result<Results> {
    let mut results = Results::default();
    let dir = tempfile::tempdir()?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(&queries, format!("{NAME} A\n"))?;

    // The agent DNS, in its own runtime, as the agent runs it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = runtime.block_on(async {
        let mut table = dns::RecordTable::new();
        table.insert("dev", "api", dns::ListenerAddrs::v4(ANSWER.parse()?))?;
        anyhow::Ok(
            dns::DnsServer::bind(
                "127.0.0.1:0".parse()?,
                dns::Records::new(table),
                dns::Upstream::none(),
            )
            .await?,
        )
    })?;
    let port = server.local_addr().port();
    match dnsperf(&queries, port, options) {
        Ok(qps) => results.record(SCENARIO, System::Gstacks, Metric::DnsQps, qps),
        Err(e) => results.unavailable(
            SCENARIO,
            System::Gstacks,
            Some(Metric::DnsQps),
            format!("{e:#}"),
        ),
    }
    runtime.block_on(async { server.shutdown().await })?;
    drop(runtime);

    match dnsmasq_qps(&queries, options) {
        Ok(qps) => results.record(SCENARIO, System::Dnsmasq, Metric::DnsQps, qps),
        Err(e) => results.unavailable(
            SCENARIO,
            System::Dnsmasq,
            Some(Metric::DnsQps),
            format!("{e:#}"),
        ),
    }
    Ok(results)
}

/// A free UDP port on 127.0.0.1 (released before dnsmasq binds it).
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// dnsmasq's figure. It binds TCP as well as UDP on its port, and a free
/// UDP port may be a busy TCP one (the agents' connections use loopback
/// ports too): a dnsmasq that exits at start is tried on another port.
fn dnsmasq_qps(queries: &std::path::Path, options: &Options) -> anyhow::Result<f64> {
    let mut failures = Vec::new();
    for _ in 0..3 {
        match dnsmasq_qps_on(free_udp_port()?, queries, options) {
            Err(Startup(why)) => failures.push(why),
            Ok(outcome) => return outcome,
        }
    }
    Err(anyhow::anyhow!(
        "dnsmasq did not start: {}",
        failures.join("; ")
    ))
}

/// dnsmasq exited before answering, saying this.
struct Startup(String);

fn dnsmasq_qps_on(
    port: u16,
    queries: &std::path::Path,
    options: &Options,
) -> Result<anyhow::Result<f64>, Startup> {
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--cache-size=0",
            &format!("--port={port}"),
            &format!("--address=/{NAME}/{ANSWER}"),
            "--pid-file=",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("dnsmasq (Debian's dnsmasq-base) is not installed");
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return Ok(Err(e)),
    };
    // Ready when it answers a query.
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = match std::net::UdpSocket::bind("127.0.0.1:0").and_then(|probe| {
        probe.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(probe)
    }) {
        Ok(probe) => probe,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Err(e.into()));
        }
    };
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 3, b'd', b'e', b'v', 7,
        b'g', b's', b't', b'a', b'c', b'k', b's', 0, 0, 1, 0, 1,
    ];
    let mut buf = [0u8; 512];
    let ready = loop {
        if Instant::now() > deadline {
            break false;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut said = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut said);
            }
            return Err(Startup(format!("port {port}: {status}: {}", said.trim())));
        }
        let _ = probe.send_to(&query, ("127.0.0.1", port));
        if probe.recv_from(&mut buf).is_ok() {
            break true;
        }
    };
    let outcome = if ready {
        dnsperf(queries, port, options)
    } else {
        Err(anyhow::anyhow!(
            "dnsmasq did not answer on 127.0.0.1:{port}"
        ))
    };
    // Only the child this run started, by its pid.
    let _ = child.kill();
    let _ = child.wait();
    Ok(outcome)
}

fn dnsperf(queries: &std::path::Path, port: u16, options: &Options) -> anyhow::Result<f64> {
    let output = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(queries)
        .args([
            "-l",
            &options.seconds.to_string(),
            "-c",
            &options.clients.to_string(),
            "-T",
            "1",
        ])
        .output()
        .context("dnsperf (Debian's dnsperf) is not installed")?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_qps(&text).with_context(|| format!("dnsperf printed no rate: {}", text.trim()))
}

fn parse_qps(text: &str) -> anyhow::Result<f64> {
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("Queries per second:") {
            return Ok(rest.trim().parse()?);
        }
    }
    bail!("no `Queries per second:` line")
}

/// One row: the agent DNS, dnsmasq, and the ratio.
pub fn table(results: &Results) -> String {
    let cell = |system| {
        results
            .get(SCENARIO, system, Metric::DnsQps)
            .map_or("n/a".to_owned(), |v| format!("{v:.0}"))
    };
    let ratio = match (
        results.get(SCENARIO, System::Gstacks, Metric::DnsQps),
        results.get(SCENARIO, System::Dnsmasq, Metric::DnsQps),
    ) {
        (Some(ours), Some(theirs)) if theirs > 0.0 => format!("{:.2}x dnsmasq", ours / theirs),
        _ => String::new(),
    };
    let mut out = format!(
        "{:<10} {:>6} {:>12} {:>12}   gstacks vs baseline\n{:<10} {:>6} {:>12} {:>12}   {ratio}\n",
        "metric",
        "unit",
        "gstacks",
        "dnsmasq",
        Metric::DnsQps.name(),
        Metric::DnsQps.unit(),
        cell(System::Gstacks),
        cell(System::Dnsmasq),
    );
    for gap in results
        .unavailable
        .iter()
        .filter(|u| u.scenario == SCENARIO)
    {
        out.push_str(&format!(
            "unavailable: {}: {}\n",
            gap.system.name(),
            gap.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsperf_rate_is_read() {
        let text = "  Queries sent:         10\n  Queries per second:   128431.517642\n";
        assert!((parse_qps(text).unwrap() - 128_431.517_642).abs() < 1e-6);
        assert!(parse_qps("nothing").is_err());
    }
}
