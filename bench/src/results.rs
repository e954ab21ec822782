//! The results every scenario reports: one JSON shape for all of
//! `gstacks-bench`, and the human-readable table with ratios to baselines.

use std::fmt::Write as _;

use serde::Serialize;

/// Who was measured: our stack or one of the baselines of the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum System {
    #[serde(rename = "gstacks")]
    Gstacks,
    #[serde(rename = "loopback")]
    Loopback,
    #[serde(rename = "onetun")]
    Onetun,
    #[serde(rename = "wireguard-go")]
    WireguardGo,
    #[serde(rename = "dnsmasq")]
    Dnsmasq,
}

impl System {
    #[cfg(test)]
    pub const ALL: [System; 5] = [
        System::Gstacks,
        System::Loopback,
        System::Onetun,
        System::WireguardGo,
        System::Dnsmasq,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Gstacks => "gstacks",
            System::Loopback => "loopback",
            System::Onetun => "onetun",
            System::WireguardGo => "wireguard-go",
            System::Dnsmasq => "dnsmasq",
        }
    }
}

/// What was measured, with its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    ThroughputUp,
    ThroughputDown,
    RttP50,
    RttP99,
    ConnectRate,
    #[serde(rename = "rss_10k_idle")]
    Rss10kIdle,
    DnsQps,
    PolicyDecisionsPerS,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::ThroughputUp => "throughput_up",
            Metric::ThroughputDown => "throughput_down",
            Metric::RttP50 => "rtt_p50",
            Metric::RttP99 => "rtt_p99",
            Metric::ConnectRate => "connect_rate",
            Metric::Rss10kIdle => "rss_10k_idle",
            Metric::DnsQps => "dns_qps",
            Metric::PolicyDecisionsPerS => "policy_decisions_per_s",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::ThroughputUp | Metric::ThroughputDown => "Mbit/s",
            Metric::RttP50 | Metric::RttP99 => "us",
            Metric::ConnectRate => "1/s",
            Metric::Rss10kIdle => "MiB",
            Metric::DnsQps | Metric::PolicyDecisionsPerS => "1/s",
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub scenario: String,
    pub metric: Metric,
    pub system: System,
    pub value: f64,
    pub unit: &'static str,
}

/// A figure that could not be measured in this run, and why. Never replaced
/// by an invented value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unavailable {
    pub scenario: String,
    pub system: System,
    pub metric: Option<Metric>,
    pub reason: String,
}

/// Everything one `gstacks-bench` run measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub results: Vec<Measurement>,
    pub unavailable: Vec<Unavailable>,
}

impl Results {
    pub fn record(&mut self, scenario: &str, system: System, metric: Metric, value: f64) {
        self.results.push(Measurement {
            scenario: scenario.to_owned(),
            metric,
            system,
            value,
            unit: metric.unit(),
        });
    }

    /// Marks a whole system (metric `None`) or one metric as unavailable.
    pub fn unavailable(
        &mut self,
        scenario: &str,
        system: System,
        metric: Option<Metric>,
        reason: impl Into<String>,
    ) {
        self.unavailable.push(Unavailable {
            scenario: scenario.to_owned(),
            system,
            metric,
            reason: reason.into(),
        });
    }

    /// Takes over the figures and gaps of another run (another scenario
    /// measured as part of this one).
    pub fn extend(&mut self, other: Results) {
        self.results.extend(other.results);
        self.unavailable.extend(other.unavailable);
    }

    /// One result per figure from several rounds of the same measurements:
    /// each figure is the median of the rounds that measured it (the upper
    /// one for an even count); a figure no round measured keeps the last
    /// round's reason.
    pub fn medians(rounds: Vec<Results>) -> Results {
        let mut merged = Results::default();
        let all: Vec<&Measurement> = rounds.iter().flat_map(|r| &r.results).collect();
        for m in &all {
            if merged.get(&m.scenario, m.system, m.metric).is_some() {
                continue;
            }
            let mut values: Vec<f64> = all
                .iter()
                .filter(|o| {
                    o.scenario == m.scenario && o.system == m.system && o.metric == m.metric
                })
                .map(|o| o.value)
                .collect();
            values.sort_by(f64::total_cmp);
            merged.record(&m.scenario, m.system, m.metric, values[values.len() / 2]);
        }
        for gap in rounds.iter().rev().flat_map(|r| &r.unavailable) {
            let measured = merged.results.iter().any(|m| {
                m.scenario == gap.scenario
                    && m.system == gap.system
                    && gap.metric.is_none_or(|metric| m.metric == metric)
            });
            let noted = merged.unavailable.iter().any(|u| {
                u.scenario == gap.scenario && u.system == gap.system && u.metric == gap.metric
            });
            if !measured && !noted {
                merged.unavailable.push(gap.clone());
            }
        }
        merged
    }

    pub fn get(&self, scenario: &str, system: System, metric: Metric) -> Option<f64> {
        self.results
            .iter()
            .find(|m| m.scenario == scenario && m.system == system && m.metric == metric)
            .map(|m| m.value)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The table for people: one row per metric, one column per system, then
    /// gstacks as a ratio of each baseline.
    pub fn table(&self, scenario: &str, metrics: &[Metric]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>12} {:>12} {:>12} {:>12}   gstacks vs baselines",
            "metric", "unit", "gstacks", "loopback", "onetun", "wireguard-go"
        );
        for &metric in metrics {
            let value = |system| self.get(scenario, system, metric);
            let cell = |system| match value(system) {
                Some(v) if v >= 100.0 => format!("{v:.0}"),
                Some(v) => format!("{v:.1}"),
                None => "n/a".to_owned(),
            };
            let mut ratios = Vec::new();
            if let Some(ours) = value(System::Gstacks) {
                for base in [System::Loopback, System::Onetun, System::WireguardGo] {
                    if let Some(theirs) = value(base) {
                        if theirs > 0.0 {
                            ratios.push(format!("{:.2}x {}", ours / theirs, base.name()));
                        }
                    }
                }
            }
            let _ = writeln!(
                out,
                "{:<16} {:>8} {:>12} {:>12} {:>12} {:>12}   {}",
                metric.name(),
                metric.unit(),
                cell(System::Gstacks),
                cell(System::Loopback),
                cell(System::Onetun),
                cell(System::WireguardGo),
                ratios.join(", ")
            );
        }
        self.write_unavailable(&mut out, Some(scenario));
        out
    }

    /// One `unavailable:` line per figure that could not be measured: of
    /// `scenario` only, or of every scenario (then named on each line).
    pub fn write_unavailable(&self, out: &mut String, scenario: Option<&str>) {
        let gaps = self
            .unavailable
            .iter()
            .filter(|u| scenario.is_none_or(|s| u.scenario == s));
        for gap in gaps {
            let what = gap.metric.map(Metric::name).unwrap_or("all metrics");
            let which = match scenario {
                Some(_) => String::new(),
                None => format!("{} ", gap.scenario),
            };
            let _ = writeln!(
                out,
                "unavailable: {which}{} {}: {}",
                gap.system.name(),
                what,
                gap.reason
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_rounds_take_each_figure_s_middle_and_keep_unmeasured_gaps() {
        let round = |up: f64, p50: Option<f64>, why: &str| {
            let mut r = Results::default();
            r.record("proxy", System::Gstacks, Metric::ThroughputUp, up);
            match p50 {
                Some(v) => r.record("proxy", System::Gstacks, Metric::RttP50, v),
                None => r.unavailable("proxy", System::Gstacks, Some(Metric::RttP50), why),
            }
            r.unavailable("proxy", System::Dnsmasq, None, why);
            r
        };
        let merged = Results::medians(vec![
            round(300.0, None, "first"),
            round(100.0, Some(9.0), "second"),
            round(200.0, None, "third"),
        ]);
        assert_eq!(
            merged.get("proxy", System::Gstacks, Metric::ThroughputUp),
            Some(200.0)
        );
        assert_eq!(
            merged.get("proxy", System::Gstacks, Metric::RttP50),
            Some(9.0)
        );
        assert_eq!(merged.results.len(), 2);
        // Measured in one round: no gap. Never measured: the last reason.
        assert_eq!(merged.unavailable.len(), 1);
        assert_eq!(merged.unavailable[0].system, System::Dnsmasq);
        assert_eq!(merged.unavailable[0].reason, "third");

        let even = Results::medians(vec![round(1.0, None, ""), round(4.0, None, "")]);
        assert_eq!(
            even.get("proxy", System::Gstacks, Metric::ThroughputUp),
            Some(4.0)
        );
    }

    #[test]
    fn json_has_the_shared_shape() {
        let mut results = Results::default();
        results.record("netstack", System::WireguardGo, Metric::Rss10kIdle, 12.5);
        results.unavailable("netstack", System::Onetun, None, "not installed");
        let json: serde_json::Value = serde_json::from_str(&results.to_json()).unwrap();
        assert_eq!(
            json["results"][0],
            serde_json::json!({
                "scenario": "netstack",
                "metric": "rss_10k_idle",
                "system": "wireguard-go",
                "value": 12.5,
                "unit": "MiB"
            })
        );
        assert_eq!(json["unavailable"][0]["system"], "onetun");
        assert_eq!(json["unavailable"][0]["reason"], "not installed");
    }

    #[test]
    fn metric_names_match_serde() {
        for metric in [
            Metric::ThroughputUp,
            Metric::ThroughputDown,
            Metric::RttP50,
            Metric::RttP99,
            Metric::ConnectRate,
            Metric::Rss10kIdle,
            Metric::DnsQps,
            Metric::PolicyDecisionsPerS,
        ] {
            assert_eq!(
                serde_json::to_value(metric).unwrap(),
                serde_json::Value::from(metric.name())
            );
        }
        for system in System::ALL {
            assert_eq!(
                serde_json::to_value(system).unwrap(),
                serde_json::Value::from(system.name())
            );
        }
    }

    #[test]
    fn table_shows_ratios_and_gaps() {
        let mut results = Results::default();
        results.record("netstack", System::Gstacks, Metric::ThroughputUp, 3000.0);
        results.record("netstack", System::Loopback, Metric::ThroughputUp, 20000.0);
        results.unavailable("netstack", System::Onetun, None, "onetun not installed");
        let table = results.table("netstack", &[Metric::ThroughputUp]);
        assert!(table.contains("0.15x loopback"), "{table}");
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("unavailable: onetun all metrics: onetun not installed"));
    }
}
