//! `halfmq user` and `halfmq acl`: users and their policies.

use anyhow::bail;
use clap::{Args, Subcommand};
use halfmq_client::{Client, Rule, Security};
use serde_json::json;

use crate::out;

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Creates a user with a generated secret, printed once: the broker
    /// keeps only a key derived from it and cannot show it again.
    Create {
        /// Name: 1 to 64 bytes of [A-Za-z0-9_.@-].
        name: String,
        /// One JSON object: user, secret.
        #[arg(long)]
        json: bool,
    },
    /// Deletes a user and its policy.
    Delete {
        /// Name.
        name: String,
    },
    /// Lists users and how many rules each has.
    List {
        /// One JSON object per line: name, created_ms, rules.
        #[arg(long)]
        json: bool,
    },
}

/// Which resource a rule is about: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// Topics: a name, or a prefix ending in '*' ('*': every topic).
    #[arg(long)]
    topic: Option<String>,
    /// Consumer groups: a name or prefix*.
    #[arg(long)]
    group: Option<String>,
    /// Producer groups: a name or prefix*.
    #[arg(long)]
    producer_group: Option<String>,
    /// The broker itself (admin on cluster is admin on everything).
    #[arg(long)]
    cluster: bool,
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// User.
    name: String,
    #[command(flatten)]
    target: Target,
    /// Comma-separated: pub, sub, tx, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    actions: Vec<String>,
    /// A deny rule (deny overrides allow).
    #[arg(long)]
    deny: bool,
}

impl RuleArgs {
    fn rule(&self) -> Rule {
        let a: Vec<&str> = self.actions.iter().map(|s| s.trim()).collect();
        let t = &self.target;
        let r = match (&t.topic, &t.group, &t.producer_group) {
            (Some(p), _, _) => Rule::topic(p, &a),
            (_, Some(p), _) => Rule::group(p, &a),
            (_, _, Some(p)) => Rule::producer_group(p, &a),
            _ => Rule::cluster(&a),
        };
        if self.deny {
            r.denied()
        } else {
            r
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AclCmd {
    /// Allows (or with --deny, denies) actions on resources to a user.
    /// Applies at once; survives restarts.
    Grant(RuleArgs),
    /// Removes actions from a user's rule of the same resource and effect.
    Revoke(RuleArgs),
    /// Lists the rules of every user, or of NAME.
    List {
        /// User.
        name: Option<String>,
        /// One JSON object per rule: user, resource, kind, pattern,
        /// actions, deny.
        #[arg(long)]
        json: bool,
    },
}

fn kind_name(r: &Rule) -> String {
    r.resource()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

pub async fn user(client: Client, cmd: UserCmd) -> anyhow::Result<()> {
    let s = Security::new(client);
    match cmd {
        UserCmd::Create { name, json } => {
            let secret = s.create_user(&name).await?;
            // RocketMQ clients sign with their own key, derived from the secret.
            let rocketmq = halfmq_proto::auth::rocketmq_secret_key(&name, &secret);
            if json {
                out::line(
                    json!({"user": name, "secret": secret, "rocketmq_secret_key": rocketmq}),
                )?;
            } else {
                out::line(format!("created user {name}; its secret (shown once):"))?;
                out::line(secret)?;
                out::line("its secret key for RocketMQ clients (access key: the user name):")?;
                out::line(rocketmq)?;
            }
        }
        UserCmd::Delete { name } => {
            s.delete_user(&name).await?;
            out::line(format!("deleted user {name}"))?;
        }
        UserCmd::List { json } => {
            let users = s.list_users(None).await?;
            if json {
                for u in users {
                    let rules: Vec<_> = u
                        .rules
                        .iter()
                        .map(|r| json!({"resource": r.resource(), "actions": r.actions, "deny": r.deny}))
                        .collect();
                    out::line(json!({"name": u.name, "created_ms": u.created_ms, "rules": rules}))?;
                }
            } else {
                let mut rows = vec![vec!["USER".to_owned(), "RULES".to_owned()]];
                rows.extend(
                    users
                        .iter()
                        .map(|u| vec![u.name.clone(), u.rules.len().to_string()]),
                );
                out::line(out::table(&rows))?;
            }
        }
    }
    Ok(())
}

pub async fn acl(client: Client, cmd: AclCmd) -> anyhow::Result<()> {
    let s = Security::new(client);
    match cmd {
        AclCmd::Grant(a) => {
            let r = a.rule();
            s.grant(&a.name, &r).await?;
            let effect = if r.deny { "denied" } else { "allowed" };
            out::line(format!(
                "{effect} {} on {} to {}",
                r.actions.join(","),
                r.resource(),
                a.name
            ))?;
        }
        AclCmd::Revoke(a) => {
            let r = a.rule();
            s.revoke(&a.name, &r).await?;
            out::line(format!(
                "revoked {} on {} from {}",
                r.actions.join(","),
                r.resource(),
                a.name
            ))?;
        }
        AclCmd::List { name, json } => {
            let users = s.list_users(name.as_deref()).await?;
            let mut rows = vec![vec![
                "USER".to_owned(),
                "EFFECT".to_owned(),
                "RESOURCE".to_owned(),
                "ACTIONS".to_owned(),
            ]];
            for u in &users {
                for r in &u.rules {
                    if json {
                        out::line(
                            json!({"user": u.name, "resource": r.resource(), "kind": kind_name(r),
                            "pattern": r.pattern, "actions": r.actions, "deny": r.deny}),
                        )?;
                    } else {
                        rows.push(vec![
                            u.name.clone(),
                            if r.deny { "deny" } else { "allow" }.to_owned(),
                            r.resource(),
                            r.actions.join(","),
                        ]);
                    }
                }
            }
            if !json {
                if rows.len() == 1 && name.is_some() {
                    bail!("{} has no rules", name.unwrap_or_default());
                }
                out::line(out::table(&rows))?;
            }
        }
    }
    Ok(())
}
