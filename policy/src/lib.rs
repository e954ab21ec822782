//! The runtime network model and the policy decision of `agent_proxy` mode.
//!
//! This crate is pure: no IO, no clock, no async. Both the source agent and the
//! target agent call [`decide`] with the same rules, and every [`Decision`]
//! says which rule allowed the connection or why it was denied. The default
//! is deny.

use std::fmt;

mod model;
pub mod sample;

pub use model::{validate_label, validate_port, ModelError};

/// Who a source is: a developer laptop node, or a sandbox with its aliases
/// and tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// A `local` node (`gstacks mesh join` on a laptop).
    pub local: bool,
    pub sandbox_id: Option<String>,
    /// Aliases the source sandbox publishes in the network.
    pub aliases: Vec<String>,
    /// Tags of the source sandbox.
    pub tags: Vec<String>,
}

impl Source {
    pub fn local() -> Self {
        Source {
            local: true,
            ..Source::default()
        }
    }

    pub fn sandbox(id: impl Into<String>) -> Self {
        Source {
            sandbox_id: Some(id.into()),
            ..Source::default()
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.local {
            return f.write_str("local");
        }
        match (&self.sandbox_id, self.aliases.first()) {
            (Some(id), Some(alias)) => write!(f, "sandbox:{id} ({alias})"),
            (Some(id), None) => write!(f, "sandbox:{id}"),
            (None, _) => f.write_str("unknown source"),
        }
    }
}

/// The `--from` side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Developer laptop nodes.
    Local,
    /// A sandbox that publishes this alias in the network.
    Alias(String),
    Sandbox(String),
    Tag(String),
    Any,
}

impl Selector {
    /// Parses `local`, `*`, `sandbox:<id>`, `tag:<tag>` or an alias name.
    pub fn parse(text: &str) -> Result<Selector, ModelError> {
        let text = text.trim();
        if text == "*" {
            return Ok(Selector::Any);
        }
        if text == "local" {
            return Ok(Selector::Local);
        }
        if let Some(id) = text.strip_prefix("sandbox:") {
            if id.is_empty() {
                return Err(ModelError::BadSelector {
                    selector: text.to_owned(),
                    why: "`sandbox:` needs a sandbox id after the colon",
                });
            }
            return Ok(Selector::Sandbox(id.to_owned()));
        }
        if let Some(tag) = text.strip_prefix("tag:") {
            if tag.is_empty() {
                return Err(ModelError::BadSelector {
                    selector: text.to_owned(),
                    why: "`tag:` needs a tag after the colon",
                });
            }
            return Ok(Selector::Tag(tag.to_owned()));
        }
        validate_label("alias", text).map_err(|_| ModelError::BadSelector {
            selector: text.to_owned(),
            why:
                "expected `local`, `*`, `sandbox:<id>`, `tag:<tag>` or an alias name (a DNS label)",
        })?;
        Ok(Selector::Alias(text.to_owned()))
    }

    pub fn matches(&self, source: &Source) -> bool {
        match self {
            Selector::Any => true,
            Selector::Local => source.local,
            Selector::Alias(alias) => source.aliases.iter().any(|a| a == alias),
            Selector::Sandbox(id) => source.sandbox_id.as_deref() == Some(id.as_str()),
            Selector::Tag(tag) => source.tags.iter().any(|t| t == tag),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Local => f.write_str("local"),
            Selector::Alias(a) => f.write_str(a),
            Selector::Sandbox(id) => write!(f, "sandbox:{id}"),
            Selector::Tag(t) => write!(f, "tag:{t}"),
            Selector::Any => f.write_str("*"),
        }
    }
}

/// The `--to` side of a rule: one alias, or every alias of the network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Alias(String),
    Any,
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, ModelError> {
        let text = text.trim();
        if text == "*" {
            return Ok(Target::Any);
        }
        validate_label("alias", text)?;
        Ok(Target::Alias(text.to_owned()))
    }

    fn matches(&self, alias: &str) -> bool {
        match self {
            Target::Any => true,
            Target::Alias(a) => a == alias,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Alias(a) => f.write_str(a),
            Target::Any => f.write_str("*"),
        }
    }
}

/// `allow --from <selector> --to <alias> [--port N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub from: Selector,
    pub to: Target,
    /// `None` = any port.
    pub port: Option<u16>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: allow {} -> {}", self.id, self.from, self.to)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => f.write_str(":*"),
        }
    }
}

/// Why a connection was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No rule matches (the default is deny).
    NoMatchingRule,
    /// The alias does not exist in the network.
    UnknownAlias,
    /// The alias exists but does not expose the port.
    PortNotExposed { exposed: Vec<u16> },
}

/// The outcome of [`decide`], with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { rule_id: String },
    Deny(DenyReason),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow { rule_id } => write!(f, "allowed by rule {rule_id}"),
            Decision::Deny(DenyReason::NoMatchingRule) => {
                f.write_str("denied: no rule allows it (default deny)")
            }
            Decision::Deny(DenyReason::UnknownAlias) => {
                f.write_str("denied: no such alias in the network")
            }
            Decision::Deny(DenyReason::PortNotExposed { exposed }) => {
                let ports: Vec<String> = exposed.iter().map(u16::to_string).collect();
                write!(
                    f,
                    "denied: the alias does not expose that port (exposed: {})",
                    ports.join(", ")
                )
            }
        }
    }
}

/// The target of a connection: an alias of the network and the ports it
/// exposes (`None` when the alias is unknown).
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub alias: &'a str,
    pub port: u16,
    pub exposed_ports: Option<&'a [u16]>,
}

/// The decision without its explanation: which rule allowed the connection
/// (its index in the rules), or the kind of denial. Made without allocating;
/// [`Verdict::explain`] turns it into the [`Decision`] that names the rule or
/// the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by `rules[index]`.
    Allow(usize),
    NoMatchingRule,
    UnknownAlias,
    PortNotExposed,
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    /// The explained [`Decision`]; `rules` and `dest` must be those the
    /// verdict was made with.
    pub fn explain(self, rules: &[Rule], dest: Destination<'_>) -> Decision {
        match self {
            Verdict::Allow(index) => match rules.get(index) {
                Some(rule) => Decision::Allow {
                    rule_id: rule.id.clone(),
                },
                // Only with rules other than the verdict's: say no rule.
                None => Decision::Deny(DenyReason::NoMatchingRule),
            },
            Verdict::NoMatchingRule => Decision::Deny(DenyReason::NoMatchingRule),
            Verdict::UnknownAlias => Decision::Deny(DenyReason::UnknownAlias),
            Verdict::PortNotExposed => Decision::Deny(DenyReason::PortNotExposed {
                exposed: dest.exposed_ports.unwrap_or_default().to_vec(),
            }),
        }
    }
}

/// The fast half of [`decide`]: the same outcome, without the explanation.
/// The first matching rule in order wins; without one the answer is deny.
pub fn verdict(rules: &[Rule], source: &Source, dest: Destination<'_>) -> Verdict {
    let Some(exposed) = dest.exposed_ports else {
        return Verdict::UnknownAlias;
    };
    if !exposed.contains(&dest.port) {
        return Verdict::PortNotExposed;
    }
    // Cheapest test first: the port, then the target alias, then the source.
    rules
        .iter()
        .position(|rule| {
            rule.port.is_none_or(|p| p == dest.port)
                && rule.to.matches(dest.alias)
                && rule.from.matches(source)
        })
        .map_or(Verdict::NoMatchingRule, Verdict::Allow)
}

/// A network's rules in order, indexed by target alias: a decision looks only
/// at the rules for its alias and the rules for `*`, merged in rule order, so
/// it gives the same answer as [`verdict`] over the whole list (the first
/// matching rule wins) while checking a few rules instead of all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Sorted by alias; each list holds indexes into `rules`, ascending.
    by_alias: Vec<(String, Vec<usize>)>,
    /// Indexes of the rules whose target is `*`, ascending.
    any_alias: Vec<usize>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        rules.into_iter().collect()
    }

    /// Appends a rule: it matches after every rule already in the set.
    pub fn push(&mut self, rule: Rule) {
        let index = self.rules.len();
        match &rule.to {
            Target::Any => self.any_alias.push(index),
            Target::Alias(alias) => {
                match self
                    .by_alias
                    .binary_search_by(|(a, _)| a.as_str().cmp(alias))
                {
                    Ok(at) => self.by_alias[at].1.push(index),
                    Err(at) => self.by_alias.insert(at, (alias.clone(), vec![index])),
                }
            }
        }
        self.rules.push(rule);
    }

    /// The rules, in order; a [`Verdict::Allow`] indexes into them.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// [`verdict`] over [`RuleSet::rules`], through the index.
    pub fn verdict(&self, source: &Source, dest: Destination<'_>) -> Verdict {
        let Some(exposed) = dest.exposed_ports else {
            return Verdict::UnknownAlias;
        };
        if !exposed.contains(&dest.port) {
            return Verdict::PortNotExposed;
        }
        let specific: &[usize] = self
            .by_alias
            .binary_search_by(|(a, _)| a.as_str().cmp(dest.alias))
            .map_or(&[], |at| &self.by_alias[at].1);
        let (mut i, mut j) = (0, 0);
        loop {
            let index = match (specific.get(i), self.any_alias.get(j)) {
                (Some(&x), Some(&y)) if x < y => {
                    i += 1;
                    x
                }
                (_, Some(&y)) => {
                    j += 1;
                    y
                }
                (Some(&x), None) => {
                    i += 1;
                    x
                }
                (None, None) => return Verdict::NoMatchingRule,
            };
            let rule = &self.rules[index];
            if rule.port.is_none_or(|p| p == dest.port) && rule.from.matches(source) {
                return Verdict::Allow(index);
            }
        }
    }

    /// [`decide`] over [`RuleSet::rules`], through the index.
    pub fn decide(&self, source: &Source, dest: Destination<'_>) -> Decision {
        self.verdict(source, dest).explain(&self.rules, dest)
    }
}

impl FromIterator<Rule> for RuleSet {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> Self {
        let mut set = RuleSet::default();
        for rule in iter {
            set.push(rule);
        }
        set
    }
}

/// Decides whether `source` may connect to `dest`, given the network's rules.
/// The first matching rule in order wins; without one the answer is deny.
pub fn decide(rules: &[Rule], source: &Source, dest: Destination<'_>) -> Decision {
    verdict(rules, source, dest).explain(rules, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, from: &str, to: &str, port: Option<u16>) -> Rule {
        Rule {
            id: id.into(),
            from: Selector::parse(from).unwrap(),
            to: Target::parse(to).unwrap(),
            port,
        }
    }

    fn to_api(port: u16) -> Destination<'static> {
        Destination {
            alias: "api",
            port,
            exposed_ports: Some(&[8080, 9090]),
        }
    }

    #[test]
    fn default_is_deny() {
        assert_eq!(
            decide(&[], &Source::local(), to_api(8080)),
            Decision::Deny(DenyReason::NoMatchingRule)
        );
    }

    #[test]
    fn local_rule_allows_only_local_and_only_its_port() {
        let rules = [rule("r1", "local", "api", Some(8080))];
        assert_eq!(
            decide(&rules, &Source::local(), to_api(8080)),
            Decision::Allow {
                rule_id: "r1".into()
            }
        );
        assert!(!decide(&rules, &Source::local(), to_api(9090)).is_allowed());
        assert!(!decide(&rules, &Source::sandbox("sbx_1"), to_api(8080)).is_allowed());
    }

    #[test]
    fn selectors_match_alias_sandbox_tag_and_any() {
        let web = Source {
            sandbox_id: Some("sbx_web".into()),
            aliases: vec!["web".into()],
            tags: vec!["frontend".into()],
            local: false,
        };
        for from in ["web", "sandbox:sbx_web", "tag:frontend", "*"] {
            let rules = [rule("r", from, "api", None)];
            assert!(decide(&rules, &web, to_api(9090)).is_allowed(), "{from}");
        }
        for from in ["worker", "sandbox:sbx_other", "tag:backend", "local"] {
            let rules = [rule("r", from, "api", None)];
            assert!(!decide(&rules, &web, to_api(9090)).is_allowed(), "{from}");
        }
    }

    #[test]
    fn unknown_alias_and_unexposed_port_explain_themselves() {
        let rules = [rule("r", "*", "*", None)];
        let unknown = Destination {
            alias: "nope",
            port: 1,
            exposed_ports: None,
        };
        assert_eq!(
            decide(&rules, &Source::local(), unknown),
            Decision::Deny(DenyReason::UnknownAlias)
        );
        let d = decide(&rules, &Source::local(), to_api(22));
        assert_eq!(
            d.to_string(),
            "denied: the alias does not expose that port (exposed: 8080, 9090)"
        );
    }

    /// The index gives the linear scan's verdict for every source, alias
    /// and port of a mixed rule set, including `*` rules interleaved with
    /// per-alias ones (the first match in rule order must win).
    #[test]
    fn the_index_agrees_with_the_linear_scan() {
        let mut rules = sample::rules(50);
        rules.insert(3, rule("any_9", "tag:team-1", "*", Some(8009)));
        rules.insert(20, rule("any_all", "sandbox:sbx_042", "*", None));
        rules.push(rule("last", "*", "*", Some(8019)));
        let set = RuleSet::new(rules.clone());
        assert_eq!(set.rules(), rules.as_slice());
        let sources = [
            Source::local(),
            Source::sandbox("sbx_042"),
            Source::sandbox("sbx_002"),
            Source {
                sandbox_id: Some("sbx_t".into()),
                aliases: vec!["svc-7".into(), "svc-14".into()],
                tags: vec!["team-1".into(), "team-3".into()],
                local: false,
            },
            Source::default(),
        ];
        let mut checked = 0;
        for source in &sources {
            for alias in (0..22).map(|i| format!("svc-{i}")) {
                for port in [8000, 8003, 8009, 8019, 9000, 1] {
                    let exposed = [8000, 8003, 8009, 8019, 9000, 1];
                    let dest = Destination {
                        alias: &alias,
                        port,
                        exposed_ports: Some(&exposed),
                    };
                    assert_eq!(
                        set.verdict(source, dest),
                        verdict(&rules, source, dest),
                        "{source} -> {alias}:{port}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 5 * 22 * 6);
        let allowed = set.decide(
            &Source::sandbox("sbx_042"),
            Destination {
                alias: "nowhere",
                port: 5,
                exposed_ports: Some(&[5]),
            },
        );
        assert_eq!(
            allowed,
            Decision::Allow {
                rule_id: "any_all".into()
            }
        );
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for bad in ["sandbox:", "tag:", "Not_A_Label", "a..b", ""] {
            let err = Selector::parse(bad).unwrap_err().to_string();
            assert!(err.contains("selector"), "{bad}: {err}");
        }
    }
}
