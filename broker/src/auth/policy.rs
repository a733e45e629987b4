//! Policies: rules of (resource pattern, actions, allow or deny) and the
//! decision they give for one action on one resource. Pure: no state, no
//! I/O.
//!
//! A rule matches a resource of its kind whose name equals its pattern, or
//! starts with it when the pattern ends in `*` (`*` alone: every name). A
//! `cluster` rule with `admin` also covers `admin` on every resource. **Deny
//! overrides allow**: an action is allowed when an allow rule matches and no
//! deny rule does; nothing matching means denied.

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send to a topic (half messages included).
    Pub,
    /// Receive from a topic as a consumer group; ack, nack, extend.
    Sub,
    /// Open a producer session of a producer group (get and answer its
    /// check-backs), send its halves, end its transactions.
    Tx,
    /// Manage: topics, consumer groups, DLQs, offsets, ending given-up
    /// halves by hand, users and policies, membership.
    Admin,
}

impl Action {
    /// Every action, in display order.
    pub const ALL: [Action; 4] = [Action::Pub, Action::Sub, Action::Tx, Action::Admin];

    fn bit(self) -> u8 {
        match self {
            Action::Pub => 1,
            Action::Sub => 2,
            Action::Tx => 4,
            Action::Admin => 8,
        }
    }

    /// The name used in policies, the CLI and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Action::Pub => "pub",
            Action::Sub => "sub",
            Action::Tx => "tx",
            Action::Admin => "admin",
        }
    }

    /// The action of a name.
    ///
    /// # Errors
    /// [`BrokerError::BadRequest`] for another name.
    pub fn parse(s: &str) -> Result<Action, BrokerError> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                BrokerError::BadRequest(format!("unknown action {s:?}: use pub, sub, tx or admin"))
            })
    }
}

/// The kind of resource a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// `topic:NAME`.
    Topic,
    /// `group:NAME`, a consumer group.
    Group,
    /// `producer-group:NAME`.
    ProducerGroup,
    /// `cluster`: the broker or broker group itself.
    Cluster,
}

impl ResourceKind {
    /// The name used in policies and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Topic => "topic",
            ResourceKind::Group => "group",
            ResourceKind::ProducerGroup => "producer-group",
            ResourceKind::Cluster => "cluster",
        }
    }

    /// The actions a rule of this kind may name.
    fn allowed_actions(self) -> &'static [Action] {
        match self {
            ResourceKind::Topic => &[Action::Pub, Action::Sub, Action::Admin],
            ResourceKind::Group => &[Action::Sub, Action::Admin],
            ResourceKind::ProducerGroup => &[Action::Tx, Action::Admin],
            ResourceKind::Cluster => &[Action::Admin],
        }
    }
}

/// One resource a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic.
    Topic(&'a str),
    /// A consumer group.
    Group(&'a str),
    /// A producer group.
    ProducerGroup(&'a str),
    /// The broker itself.
    Cluster,
}

impl Resource<'_> {
    /// Its kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::Topic(_) => ResourceKind::Topic,
            Resource::Group(_) => ResourceKind::Group,
            Resource::ProducerGroup(_) => ResourceKind::ProducerGroup,
            Resource::Cluster => ResourceKind::Cluster,
        }
    }

    fn name(&self) -> &str {
        match self {
            Resource::Topic(n) | Resource::Group(n) | Resource::ProducerGroup(n) => n,
            Resource::Cluster => "",
        }
    }
}

impl std::fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Cluster => f.write_str("cluster"),
            r => write!(f, "{}:{}", r.kind().name(), r.name()),
        }
    }
}

/// Longest rule pattern, bytes (a topic name's limit).
pub const MAX_PATTERN_BYTES: usize = 127;

/// One rule of a user's policy. Saved and replicated as JSON
/// `{"kind":"topic","pattern":"orders-*","actions":["pub"],"deny":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RuleWire", into = "RuleWire")]
pub struct Rule {
    /// What it is about.
    pub kind: ResourceKind,
    /// A name, or a prefix ending in `*`; empty for `cluster`.
    pub pattern: String,
    bits: u8,
    /// A deny rule.
    pub deny: bool,
}

#[derive(Serialize, Deserialize)]
struct RuleWire {
    kind: ResourceKind,
    pattern: String,
    actions: Vec<String>,
    deny: bool,
}

impl TryFrom<RuleWire> for Rule {
    type Error = BrokerError;
    fn try_from(w: RuleWire) -> Result<Rule, BrokerError> {
        Rule::new(w.kind, &w.pattern, &w.actions, w.deny)
    }
}

impl From<Rule> for RuleWire {
    fn from(r: Rule) -> RuleWire {
        RuleWire {
            actions: r.actions().iter().map(|a| (*a).to_owned()).collect(),
            kind: r.kind,
            pattern: r.pattern,
            deny: r.deny,
        }
    }
}

impl Rule {
    /// A checked rule: the pattern fits the resource names' rule
    /// (`[%|a-zA-Z0-9_-]`, at most 127 bytes, optionally ending in `*`), and
    /// each action is one the kind can have (`pub`/`sub`/`admin` on topics,
    /// `sub`/`admin` on consumer groups, `tx`/`admin` on producer groups,
    /// `admin` on `cluster`).
    ///
    /// # Errors
    /// [`BrokerError::BadRequest`] saying what is wrong.
    pub fn new(
        kind: ResourceKind,
        pattern: &str,
        actions: &[String],
        deny: bool,
    ) -> Result<Rule, BrokerError> {
        let bad = |m: String| Err(BrokerError::BadRequest(m));
        if kind == ResourceKind::Cluster {
            if !pattern.is_empty() {
                return bad("a cluster rule has no name pattern".into());
            }
        } else {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern.is_empty() {
                return bad(format!("a {} rule needs a name or prefix*", kind.name()));
            }
            if pattern.len() > MAX_PATTERN_BYTES
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"%|_-".contains(&b))
            {
                return bad(format!(
                    "pattern {pattern:?}: a name of [%|a-zA-Z0-9_-], at most {MAX_PATTERN_BYTES} bytes, optionally ending in *"
                ));
            }
        }
        if actions.is_empty() {
            return bad("a rule needs at least one action".into());
        }
        let mut bits = 0u8;
        for a in actions {
            let a = Action::parse(a)?;
            if !kind.allowed_actions().contains(&a) {
                let ok: Vec<&str> = kind.allowed_actions().iter().map(|a| a.name()).collect();
                return bad(format!(
                    "{} cannot be granted on a {} (only {})",
                    a.name(),
                    kind.name(),
                    ok.join(", ")
                ));
            }
            bits |= a.bit();
        }
        Ok(Rule {
            kind,
            pattern: pattern.to_owned(),
            bits,
            deny,
        })
    }

    /// Its actions' names, in [`Action::ALL`] order.
    pub fn actions(&self) -> Vec<&'static str> {
        Action::ALL
            .into_iter()
            .filter(|a| self.bits & a.bit() != 0)
            .map(Action::name)
            .collect()
    }

    /// Whether this rule is about `action` on `res`.
    fn matches(&self, action: Action, res: &Resource<'_>) -> bool {
        if self.bits & action.bit() == 0 {
            return false;
        }
        if self.kind == ResourceKind::Cluster && action == Action::Admin {
            return true;
        }
        if self.kind != res.kind() {
            return false;
        }
        match self.pattern.strip_suffix('*') {
            Some(prefix) => res.name().starts_with(prefix),
            None => self.kind == ResourceKind::Cluster || res.name() == self.pattern,
        }
    }

    /// Whether `other` is the same rule but for its actions.
    pub fn same_target(&self, other: &Rule) -> bool {
        self.kind == other.kind && self.pattern == other.pattern && self.deny == other.deny
    }

    /// This rule with `other`'s actions added.
    pub fn with_added(&self, other: &Rule) -> Rule {
        Rule {
            bits: self.bits | other.bits,
            ..self.clone()
        }
    }

    /// This rule without `other`'s actions; `None` when none is left.
    pub fn without(&self, other: &Rule) -> Option<Rule> {
        let left = self.bits & !other.bits;
        (left != 0).then(|| Rule {
            bits: left,
            ..self.clone()
        })
    }
}

/// Whether `rules` allow `action` on `res`: an allow rule matches and no
/// deny rule does.
pub fn allows(rules: &[Rule], action: Action, res: &Resource<'_>) -> bool {
    let mut allowed = false;
    for r in rules.iter().filter(|r| r.matches(action, res)) {
        if r.deny {
            return false;
        }
        allowed = true;
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: ResourceKind, pattern: &str, actions: &[&str], deny: bool) -> Rule {
        let a: Vec<String> = actions.iter().map(|s| (*s).to_owned()).collect();
        Rule::new(kind, pattern, &a, deny).unwrap()
    }

    #[test]
    fn exact_and_prefix_patterns() {
        let rules = vec![
            rule(ResourceKind::Topic, "orders", &["pub"], false),
            rule(ResourceKind::Topic, "audit-*", &["sub"], false),
        ];
        assert!(allows(&rules, Action::Pub, &Resource::Topic("orders")));
        assert!(!allows(&rules, Action::Pub, &Resource::Topic("orders2")));
        assert!(!allows(&rules, Action::Sub, &Resource::Topic("orders")));
        assert!(allows(&rules, Action::Sub, &Resource::Topic("audit-eu")));
        assert!(!allows(&rules, Action::Sub, &Resource::Topic("audit")));
        // A topic rule says nothing of a consumer group of the same name.
        assert!(!allows(&rules, Action::Sub, &Resource::Group("audit-eu")));
        assert!(!allows(&[], Action::Pub, &Resource::Topic("orders")));
        let all = vec![rule(ResourceKind::Group, "*", &["sub"], false)];
        assert!(allows(&all, Action::Sub, &Resource::Group("anything")));
    }

    #[test]
    fn deny_overrides_allow_in_any_order() {
        let allow = rule(ResourceKind::Topic, "orders-*", &["pub", "sub"], false);
        let deny = rule(ResourceKind::Topic, "orders-secret", &["pub"], true);
        for rules in [vec![allow.clone(), deny.clone()], vec![deny, allow]] {
            assert!(!allows(
                &rules,
                Action::Pub,
                &Resource::Topic("orders-secret")
            ));
            assert!(allows(
                &rules,
                Action::Sub,
                &Resource::Topic("orders-secret")
            ));
            assert!(allows(&rules, Action::Pub, &Resource::Topic("orders-eu")));
        }
    }

    #[test]
    fn cluster_admin_covers_admin_everywhere_but_not_other_actions() {
        let rules = vec![rule(ResourceKind::Cluster, "", &["admin"], false)];
        assert!(allows(&rules, Action::Admin, &Resource::Cluster));
        assert!(allows(&rules, Action::Admin, &Resource::Topic("t")));
        assert!(allows(
            &rules,
            Action::Admin,
            &Resource::ProducerGroup("pg")
        ));
        assert!(!allows(&rules, Action::Pub, &Resource::Topic("t")));
        let mut denied = rules.clone();
        denied.push(rule(ResourceKind::Topic, "t", &["admin"], true));
        assert!(!allows(&denied, Action::Admin, &Resource::Topic("t")));
        assert!(allows(&denied, Action::Admin, &Resource::Topic("u")));
    }

    #[test]
    fn bad_rules_are_refused_with_a_reason() {
        let a = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let err = |r: Result<Rule, BrokerError>| r.unwrap_err().to_string();
        assert!(err(Rule::new(ResourceKind::Topic, "t", &a(&["tx"]), false))
            .contains("only pub, sub, admin"));
        assert!(
            err(Rule::new(ResourceKind::Topic, "t", &a(&["fly"]), false))
                .contains("unknown action")
        );
        assert!(
            err(Rule::new(ResourceKind::Topic, "a*b", &a(&["pub"]), false)).contains("pattern")
        );
        assert!(
            err(Rule::new(ResourceKind::Topic, "", &a(&["pub"]), false)).contains("needs a name")
        );
        assert!(
            err(Rule::new(ResourceKind::Cluster, "x", &a(&["admin"]), false)).contains("no name")
        );
        assert!(err(Rule::new(ResourceKind::Group, "g", &a(&[]), false)).contains("at least one"));
    }

    #[test]
    fn add_and_remove_actions() {
        let r = rule(ResourceKind::Topic, "t", &["pub"], false);
        let more = r.with_added(&rule(ResourceKind::Topic, "t", &["sub"], false));
        assert_eq!(more.actions(), vec!["pub", "sub"]);
        let less = more
            .without(&rule(ResourceKind::Topic, "t", &["pub"], false))
            .unwrap();
        assert_eq!(less.actions(), vec!["sub"]);
        assert!(less.without(&less).is_none());
        let json = serde_json::to_string(&less).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"topic","pattern":"t","actions":["sub"],"deny":false}"#
        );
        assert_eq!(serde_json::from_str::<Rule>(&json).unwrap(), less);
        assert!(serde_json::from_str::<Rule>(
            r#"{"kind":"topic","pattern":"t","actions":["tx"],"deny":false}"#
        )
        .is_err());
    }
}
