//! A realistic rule set and a mix of connections to decide against it, for
//! the benchmarks (`policy/benches/decide.rs` and `gstacks-bench proxy`),
//! so that both measure the same thing.

use crate::{Destination, Rule, Selector, Source, Target};

/// Aliases the sample network has.
const ALIASES: usize = 20;

/// `n` rules (ids `pol_000`...) over 20 aliases `svc-0`..`svc-19`, the
/// selectors in turn an alias, a tag, a sandbox id and `local`; every third
/// rule allows any port, the others one port (`8000 + alias number`).
pub fn rules(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| Rule {
            id: format!("pol_{i:03}"),
            from: match i % 4 {
                0 => Selector::Alias(format!("svc-{}", (i * 7) % ALIASES)),
                1 => Selector::Tag(format!("team-{}", i % 6)),
                2 => Selector::Sandbox(sandbox_id(i)),
                _ => Selector::Local,
            },
            to: Target::Alias(format!("svc-{}", i % ALIASES)),
            port: (i % 3 != 0).then(|| port_of(i)),
        })
        .collect()
}

fn sandbox_id(i: usize) -> String {
    format!("sbx_{i:03}")
}

fn port_of(i: usize) -> u16 {
    // i % ALIASES < 20: always fits.
    8000 + u16::try_from(i % ALIASES).unwrap_or(0)
}

/// One connection to decide.
#[derive(Debug, Clone)]
pub struct Query {
    pub source: Source,
    pub alias: String,
    pub port: u16,
    pub exposed: Vec<u16>,
}

impl Query {
    pub fn destination(&self) -> Destination<'_> {
        Destination {
            alias: &self.alias,
            port: self.port,
            exposed_ports: Some(&self.exposed),
        }
    }
}

/// Four connections against [`rules`]`(n)` (n >= 4): one allowed by the
/// second rule, one allowed only by the last sandbox rule (a scan of almost
/// every rule), one that no rule allows (a scan of all of them) and one to a
/// port the alias does not expose.
pub fn queries(n: usize) -> Vec<Query> {
    let query = |source: Source, alias: usize, port: u16| Query {
        source,
        alias: format!("svc-{}", alias % ALIASES),
        port,
        exposed: vec![port_of(alias), port_of(alias) + 1000],
    };
    let late = (0..n).rev().find(|i| i % 4 == 2).unwrap_or(2);
    let team = Source {
        sandbox_id: Some("sbx_team".to_owned()),
        aliases: vec!["frontend".to_owned()],
        tags: vec!["team-1".to_owned()],
        local: false,
    };
    let stranger = Source {
        sandbox_id: Some("sbx_stranger".to_owned()),
        aliases: vec!["web".to_owned()],
        tags: vec!["outsider".to_owned()],
        local: false,
    };
    vec![
        query(team, 1, port_of(1)),
        query(Source::sandbox(sandbox_id(late)), late, port_of(late)),
        query(stranger, 5, port_of(5)),
        query(Source::local(), 3, 9999),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decide, verdict, Decision, DenyReason, Verdict};

    #[test]
    fn the_mix_allows_early_and_late_and_denies_both_ways() {
        let rules = rules(50);
        assert_eq!(rules.len(), 50);
        let verdicts: Vec<Verdict> = queries(50)
            .iter()
            .map(|q| verdict(&rules, &q.source, q.destination()))
            .collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Allow(1),
                Verdict::Allow(46),
                Verdict::NoMatchingRule,
                Verdict::PortNotExposed
            ]
        );
        // The explained decisions agree with the verdicts.
        let q = queries(50);
        assert_eq!(
            decide(&rules, &q[1].source, q[1].destination()),
            Decision::Allow {
                rule_id: "pol_046".into()
            }
        );
        assert_eq!(
            decide(&rules, &q[3].source, q[3].destination()),
            Decision::Deny(DenyReason::PortNotExposed {
                exposed: vec![8003, 9003]
            })
        );
    }
}
