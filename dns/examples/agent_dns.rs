//! Serves the agent DNS by hand, for `dig` or `dnsperf`:
//!
//! ```text
//! cargo run --release -p dns --example agent_dns -- 127.0.0.1:5300 api.dev=127.77.0.1 db.dev=127.77.0.2
//! dig @127.0.0.1 -p 5300 api.dev.gstacks
//! ```
//!
//! Other names are forwarded to the resolvers of /etc/resolv.conf. Ctrl-C
//! stops it.

use std::{net::SocketAddr, process::ExitCode};

use dns::{DnsServer, ListenerAddrs, RecordTable, Records, Upstream};

fn parse_args(args: &[String]) -> Result<(SocketAddr, RecordTable), String> {
    let usage = "usage: agent_dns ADDR [ALIAS.NETWORK=IPV4[,IPV6]]...";
    let addr = args
        .first()
        .ok_or(usage)?
        .parse()
        .map_err(|e| format!("ADDR: {e}\n{usage}"))?;
    let mut table = RecordTable::new();
    for arg in &args[1..] {
        let (name, ips) = arg
            .split_once('=')
            .ok_or_else(|| format!("`{arg}`: expected ALIAS.NETWORK=IPV4\n{usage}"))?;
        let (alias, network) = name
            .split_once('.')
            .ok_or_else(|| format!("`{name}`: expected ALIAS.NETWORK"))?;
        let (v4, v6) = match ips.split_once(',') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (ips, None),
        };
        let mut addrs = ListenerAddrs::v4(v4.parse().map_err(|e| format!("`{v4}`: {e}"))?);
        if let Some(v6) = v6 {
            addrs = addrs.with_ipv6(v6.parse().map_err(|e| format!("`{v6}`: {e}"))?);
        }
        table
            .insert(network, alias, addrs)
            .map_err(|e| e.to_string())?;
    }
    Ok((addr, table))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, table) = match parse_args(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("agent_dns: {message}");
            return ExitCode::from(2);
        }
    };
    let upstream = Upstream::system().unwrap_or_else(|error| {
        eprintln!("agent_dns: {error}; other names get SERVFAIL");
        Upstream::none()
    });
    let server = match DnsServer::bind(addr, Records::new(table), upstream).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("agent_dns: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("agent DNS on {}", server.local_addr());
    if let Err(error) = tokio::signal::ctrl_c().await {
        eprintln!("agent_dns: {error}");
    }
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agent_dns: {error}");
            ExitCode::FAILURE
        }
    }
}
