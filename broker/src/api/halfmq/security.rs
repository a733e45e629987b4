//! The `Security` service: users and policies. Every call needs `admin` on
//! `cluster`; every change is logged (target `halfmq::audit`).

use halfmq_proto::v1 as pb;
use tonic::{Request, Response};

use super::{ok, status, who, Rpc, Services};
use crate::auth::policy::{Action, Resource, ResourceKind, Rule};
use crate::auth::users::{Change, User};
use crate::auth::verify::Principal;
use crate::error::BrokerError;

fn kind_of(k: i32) -> Result<ResourceKind, BrokerError> {
    match pb::ResourceKind::try_from(k) {
        Ok(pb::ResourceKind::ResourceTopic) => Ok(ResourceKind::Topic),
        Ok(pb::ResourceKind::ResourceGroup) => Ok(ResourceKind::Group),
        Ok(pb::ResourceKind::ResourceProducerGroup) => Ok(ResourceKind::ProducerGroup),
        Ok(pb::ResourceKind::ResourceCluster) => Ok(ResourceKind::Cluster),
        _ => Err(BrokerError::BadRequest(
            "a rule needs a resource kind: topic, group, producer-group or cluster".into(),
        )),
    }
}

fn wire_kind(k: ResourceKind) -> pb::ResourceKind {
    match k {
        ResourceKind::Topic => pb::ResourceKind::ResourceTopic,
        ResourceKind::Group => pb::ResourceKind::ResourceGroup,
        ResourceKind::ProducerGroup => pb::ResourceKind::ResourceProducerGroup,
        ResourceKind::Cluster => pb::ResourceKind::ResourceCluster,
    }
}

fn rule_of(r: Option<pb::Rule>) -> Result<Rule, BrokerError> {
    let r = r.ok_or_else(|| BrokerError::BadRequest("rule is missing".into()))?;
    Rule::new(kind_of(r.kind)?, &r.pattern, &r.actions, r.deny)
}

fn wire_user(u: User) -> pb::UserInfo {
    pb::UserInfo {
        name: u.name,
        created_ms: u.created_ms,
        rules: u
            .rules
            .into_iter()
            .map(|r| pb::Rule {
                kind: wire_kind(r.kind) as i32,
                actions: r.actions().iter().map(|a| (*a).to_owned()).collect(),
                pattern: r.pattern,
                deny: r.deny,
            })
            .collect(),
    }
}

impl Services {
    /// Applies a change for `who` (already allowed) and logs it.
    async fn security_change(
        &self,
        who: Option<&Principal>,
        what: &str,
        on: &str,
        change: Result<Change, BrokerError>,
    ) -> Option<pb::Status> {
        let res = match change {
            Ok(c) => self.broker.change_security(c).await,
            Err(e) => Err(e),
        };
        let s = match res {
            Ok(()) => ok(),
            Err(e) => status(&e),
        };
        self.audit(who, what, on, &s);
        s
    }
}

fn describe(user: &str, r: &Option<pb::Rule>) -> String {
    match rule_of(r.clone()) {
        Ok(rule) => {
            let target = match rule.kind {
                ResourceKind::Cluster => "cluster".to_owned(),
                k => format!("{}:{}", k.name(), rule.pattern),
            };
            format!(
                "user:{user} {} {} on {target}",
                if rule.deny { "deny" } else { "allow" },
                rule.actions().join(",")
            )
        }
        Err(_) => format!("user:{user}"),
    }
}

#[tonic::async_trait]
impl pb::security_server::Security for Services {
    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Rpc<pb::CreateUserResponse> {
        let w = who(&req);
        self.allow(w.as_ref(), Action::Admin, Resource::Cluster, "CreateUser")?;
        let r = req.into_inner();
        let change = <[u8; 32]>::try_from(r.stored_key.as_ref())
            .map_err(|_| BrokerError::BadRequest("stored_key must be 32 bytes".into()))
            .map(|k| Change::CreateUser {
                name: r.name.clone(),
                stored_key: halfmq_proto::auth::hex(&k),
                created_ms: self.broker.now_ms(),
                rocketmq_key: (!r.rocketmq_secret_key.is_empty())
                    .then(|| r.rocketmq_secret_key.clone()),
            });
        let on = format!("user:{}", r.name);
        let status = self
            .security_change(w.as_ref(), "create user", &on, change)
            .await;
        Ok(Response::new(pb::CreateUserResponse { status }))
    }

    async fn delete_user(
        &self,
        req: Request<pb::DeleteUserRequest>,
    ) -> Rpc<pb::DeleteUserResponse> {
        let w = who(&req);
        self.allow(w.as_ref(), Action::Admin, Resource::Cluster, "DeleteUser")?;
        let name = req.into_inner().name;
        let on = format!("user:{name}");
        let change = Ok(Change::DeleteUser { name });
        let status = self
            .security_change(w.as_ref(), "delete user", &on, change)
            .await;
        Ok(Response::new(pb::DeleteUserResponse { status }))
    }

    async fn list_users(&self, req: Request<pb::ListUsersRequest>) -> Rpc<pb::ListUsersResponse> {
        self.allow(
            who(&req).as_ref(),
            Action::Admin,
            Resource::Cluster,
            "ListUsers",
        )?;
        let name = req.into_inner().name;
        let users = self
            .broker
            .users()
            .list((!name.is_empty()).then_some(name.as_str()));
        let status = if !name.is_empty() && users.is_empty() {
            status(&BrokerError::UserNotFound(name))
        } else {
            ok()
        };
        Ok(Response::new(pb::ListUsersResponse {
            status,
            users: users.into_iter().map(wire_user).collect(),
        }))
    }

    async fn grant(&self, req: Request<pb::GrantRequest>) -> Rpc<pb::GrantResponse> {
        let w = who(&req);
        self.allow(w.as_ref(), Action::Admin, Resource::Cluster, "Grant")?;
        let r = req.into_inner();
        let on = describe(&r.user, &r.rule);
        let change = rule_of(r.rule).map(|rule| Change::Grant { user: r.user, rule });
        let status = self.security_change(w.as_ref(), "grant", &on, change).await;
        Ok(Response::new(pb::GrantResponse { status }))
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Rpc<pb::RevokeResponse> {
        let w = who(&req);
        self.allow(w.as_ref(), Action::Admin, Resource::Cluster, "Revoke")?;
        let r = req.into_inner();
        let on = describe(&r.user, &r.rule);
        let change = rule_of(r.rule).map(|rule| Change::Revoke { user: r.user, rule });
        let status = self
            .security_change(w.as_ref(), "revoke", &on, change)
            .await;
        Ok(Response::new(pb::RevokeResponse { status }))
    }
}
