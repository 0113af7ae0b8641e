//! Who a request is from, and what that identity may do: [`Identity`] and the model policies
//! ([`PolicySet`]) that the gateway evaluates on every request.
//!
//! Owns: the identity every request is attributed to (a person from an OIDC issuer, a service token, or
//! anonymous where allowed), the `[[policies]]` configuration and its evaluation. Precedence, in one place:
//!
//! 1. Policies sit at three levels, most specific first: the subject (`user = ...` for a person, matched
//!    against the user id or email; `service_token = ...` for a token, matched against its name), then
//!    groups (`group = ...`; a service token's owning team counts as its group), then `default = true`.
//! 2. At each level, a deny that matches (a model pattern matching any name of the request's model, see
//!    below, or a provider pattern matching the provider) beats any allow at that level. An allow that
//!    matches decides the request at that level.
//! 3. A level with no matching rule passes the decision to the next. When no level decided and some
//!    applicable policy has an allow list, the request is denied (an allow list means "only these");
//!    when none has, the request is allowed.
//! 4. The `max_tokens` cap comes from the most specific level that sets one; between several groups, the
//!    largest cap wins (group grants add up, as allows do). What a request asking for more gets is the
//!    capping policy's `on_max_tokens`: `"lower"` (the default: the request is lowered to the cap) or
//!    `"refuse"` (403).
//!
//! So a user's own allow beats their group's deny ("user beats group"), and a deny beats an allow of the
//! same level ("deny beats allow").
//!
//! One model identity ([`ModelNames`]): a model pattern matches a request when it matches the name the
//! client asked for, the upstream name the route sends, or the canonical price-sheet name of the model the
//! provider will bill (its dated snapshots and other aliases resolve to it). So `gpt-4o` covers
//! `gpt-4o-2024-08-06`, and a deny matching any of the three names denies. Budget model filters follow the
//! same rule (`crate::budget`).
//!
//! Fails: configuration problems are returned as (field, reason) pairs for the config's error list;
//! evaluation never fails. Cost: evaluation is a walk over the policies that apply to the identity (glob
//! matches of a few patterns, well under a microsecond for tens of policies); it runs once per request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What kind of caller a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// A person, from a verified OIDC JWT.
    User,
    /// A CI/CD agent or service, from a Tollgate service token.
    Service,
    /// No credential, where `auth.allow_anonymous` permits it.
    Anonymous,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::User => "user",
            IdentityKind::Service => "service",
            IdentityKind::Anonymous => "anonymous",
        }
    }
}

/// The caller every request is attributed to. Cheap to clone (shared strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: IdentityKind,
    /// The user id claim's value, the service token's name, or `anonymous`.
    pub subject: Arc<str>,
    /// The `email` claim, where the issuer sends one.
    pub email: Option<Arc<str>>,
    /// Group names after the issuer's mapping; a service token's team.
    pub groups: Arc<[Arc<str>]>,
    /// The issuer's configured name, or `service-token`, or `anonymous`.
    pub source: Arc<str>,
    /// A service token's public id (never the secret).
    pub token_id: Option<Arc<str>>,
    /// What request attributes can be taken from (`[attributes]` entries with `from = "claim:NAME"` or
    /// `from = "token:NAME"`): for a person, the JWT claims those entries name (only those are kept, so
    /// verification copies no other claim); for a service token, the token's own `attributes`. (name,
    /// value) pairs, shared: cloning an identity copies no string.
    pub attributes: Arc<[(Arc<str>, Arc<str>)]>,
}

impl Identity {
    /// The identity of a request without credentials, where that is allowed.
    pub fn anonymous() -> Identity {
        Identity {
            kind: IdentityKind::Anonymous,
            subject: Arc::from("anonymous"),
            email: None,
            groups: Arc::from(Vec::new()),
            source: Arc::from("anonymous"),
            token_id: None,
            attributes: Arc::from(Vec::new()),
        }
    }

    /// The value of the identity attribute `name` (a kept claim, or a service token's attribute).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| **n == *name)
            .map(|(_, v)| &**v)
    }
}

/// `[[policies]]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RawPolicy {
    /// Named in 403 errors and logs.
    pub name: String,
    /// Exactly one of `user`, `group`, `service_token` or `default = true` says whom this applies to.
    pub user: Option<String>,
    pub group: Option<String>,
    pub service_token: Option<String>,
    pub default: Option<bool>,
    /// Globs over model names (the requested name, the upstream model it routes to, and the canonical
    /// price-sheet name of the billed model).
    #[serde(default)]
    pub allow_models: Vec<String>,
    #[serde(default)]
    pub deny_models: Vec<String>,
    /// Globs over provider names.
    #[serde(default)]
    pub allow_providers: Vec<String>,
    #[serde(default)]
    pub deny_providers: Vec<String>,
    /// The largest `max_tokens` (or `max_completion_tokens`) a request may ask for.
    pub max_tokens: Option<u64>,
    /// What a request asking for more than `max_tokens` gets: `"lower"` (the default) lowers it to the cap,
    /// `"refuse"` refuses it (403).
    pub on_max_tokens: Option<String>,
}

/// What a request asking for more output than its policy's `max_tokens` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMaxTokens {
    /// Lowered to the cap (the body rewritten so the provider enforces it; reserved and billed at it).
    #[default]
    Lower,
    /// Refused with 403 naming the policy.
    Refuse,
}

impl OnMaxTokens {
    pub fn as_str(self) -> &'static str {
        match self {
            OnMaxTokens::Lower => "lower",
            OnMaxTokens::Refuse => "refuse",
        }
    }
}

/// The effective output cap of a request: how many tokens, which policy sets it, and what a request asking
/// for more gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub tokens: u64,
    pub policy: Arc<str>,
    pub on_over: OnMaxTokens,
}

/// Whom a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    User(String),
    Group(String),
    ServiceToken(String),
    Default,
}

/// One validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: Arc<str>,
    pub subject: Subject,
    allow_models: Vec<glob::Pattern>,
    deny_models: Vec<glob::Pattern>,
    allow_providers: Vec<glob::Pattern>,
    deny_providers: Vec<glob::Pattern>,
    pub max_tokens: Option<u64>,
    pub on_max_tokens: OnMaxTokens,
}

impl Policy {
    fn has_allow_list(&self) -> bool {
        !self.allow_models.is_empty() || !self.allow_providers.is_empty()
    }

    fn denies(&self, r: &PolicyRequest<'_>) -> bool {
        any_model(&self.deny_models, r) || self.deny_providers.iter().any(|p| p.matches(r.provider))
    }

    fn allows(&self, r: &PolicyRequest<'_>) -> bool {
        any_model(&self.allow_models, r)
            || self.allow_providers.iter().any(|p| p.matches(r.provider))
    }

    fn applies_at(&self, level: Level, id: &Identity) -> bool {
        match (&self.subject, level) {
            (Subject::User(u), Level::Subject) => {
                id.kind == IdentityKind::User
                    && (*u == *id.subject || id.email.as_deref() == Some(u.as_str()))
            }
            (Subject::ServiceToken(n), Level::Subject) => {
                id.kind == IdentityKind::Service && *n == *id.subject
            }
            (Subject::Group(g), Level::Group) => id.groups.iter().any(|x| **x == *g),
            (Subject::Default, Level::Default) => true,
            _ => false,
        }
    }
}

fn any_model(pats: &[glob::Pattern], r: &PolicyRequest<'_>) -> bool {
    pats.iter().any(|p| r.names().matched_by(p))
}

/// Every name one request's model goes by: what a model pattern (a policy's or a budget's) is matched
/// against. See the module docs for the rule.
#[derive(Debug, Clone, Copy)]
pub struct ModelNames<'a> {
    /// The model name the client asked for.
    pub requested: &'a str,
    /// The upstream model the route sends it to, when it renames.
    pub upstream: Option<&'a str>,
    /// The canonical price-sheet name of the model the provider will bill (the upstream name, or the
    /// requested one), when the sheet lists it.
    pub canonical: Option<&'a str>,
}

impl ModelNames<'_> {
    /// Whether `p` matches any of the names.
    pub fn matched_by(&self, p: &glob::Pattern) -> bool {
        p.matches(self.requested)
            || self.upstream.is_some_and(|u| p.matches(u))
            || self.canonical.is_some_and(|c| p.matches(c))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Subject,
    Group,
    Default,
}

const LEVELS: [Level; 3] = [Level::Subject, Level::Group, Level::Default];

/// What a policy decision is about.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    /// The model name the client asked for.
    pub model: &'a str,
    /// The upstream model the route sends it to, when it renames.
    pub upstream_model: Option<&'a str>,
    /// The canonical price-sheet name of the model the provider will bill, when the sheet lists it
    /// (`PriceBook::canonical` of the upstream name, or of the requested one).
    pub canonical_model: Option<&'a str>,
    /// The provider's configured name.
    pub provider: &'a str,
}

impl<'a> PolicyRequest<'a> {
    /// The names a model pattern is matched against.
    pub fn names(&self) -> ModelNames<'a> {
        ModelNames {
            requested: self.model,
            upstream: self.upstream_model,
            canonical: self.canonical_model,
        }
    }
}

/// The outcome of evaluating the policies for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The effective cap on `max_tokens`, the policy it comes from and what asking for more gets.
        max_tokens: Option<Cap>,
    },
    Deny {
        policy: Arc<str>,
        reason: String,
    },
}

/// Every configured policy, validated, in file order.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

impl PolicySet {
    /// Validates `[[policies]]`; problems come back as (field, reason) pairs.
    pub fn from_raw(raw: Vec<RawPolicy>) -> Result<PolicySet, Vec<(String, String)>> {
        let mut issues = Vec::new();
        let mut policies = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (i, p) in raw.into_iter().enumerate() {
            let at = |f: &str| format!("policies[{i}].{f}");
            if p.name.is_empty() || p.name.len() > 128 {
                issues.push((at("name"), "must be 1 to 128 characters".to_owned()));
            } else if !names.insert(p.name.clone()) {
                issues.push((
                    at("name"),
                    format!("{:?} is used by another policy", p.name),
                ));
            }
            let subjects: Vec<Subject> = [
                p.user.clone().map(Subject::User),
                p.group.clone().map(Subject::Group),
                p.service_token.clone().map(Subject::ServiceToken),
                (p.default == Some(true)).then_some(Subject::Default),
            ]
            .into_iter()
            .flatten()
            .collect();
            let subject = match subjects.as_slice() {
                [one] => one.clone(),
                _ => {
                    issues.push((
                        at("user"),
                        "set exactly one of user, group, service_token or default = true"
                            .to_owned(),
                    ));
                    Subject::Default
                }
            };
            let mut globs = |field: &str, v: &[String]| -> Vec<glob::Pattern> {
                v.iter()
                    .enumerate()
                    .filter_map(|(j, g)| match glob::Pattern::new(g) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            issues.push((format!("policies[{i}].{field}[{j}]"), e.to_string()));
                            None
                        }
                    })
                    .collect()
            };
            let policy = Policy {
                allow_models: globs("allow_models", &p.allow_models),
                deny_models: globs("deny_models", &p.deny_models),
                allow_providers: globs("allow_providers", &p.allow_providers),
                deny_providers: globs("deny_providers", &p.deny_providers),
                name: Arc::from(p.name.as_str()),
                subject,
                max_tokens: p.max_tokens,
                on_max_tokens: match p.on_max_tokens.as_deref() {
                    None | Some("lower") => OnMaxTokens::Lower,
                    Some("refuse") => OnMaxTokens::Refuse,
                    Some(other) => {
                        issues.push((
                            at("on_max_tokens"),
                            format!("{other:?} is not one of \"lower\", \"refuse\""),
                        ));
                        OnMaxTokens::Lower
                    }
                },
            };
            if policy.max_tokens == Some(0) {
                issues.push((at("max_tokens"), "must be at least 1".to_owned()));
            }
            if p.on_max_tokens.is_some() && policy.max_tokens.is_none() {
                issues.push((
                    at("on_max_tokens"),
                    "only means something with max_tokens, which this policy does not set"
                        .to_owned(),
                ));
            }
            policies.push(policy);
        }
        if issues.is_empty() {
            Ok(PolicySet { policies })
        } else {
            Err(issues)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Decides whether `id` may make request `r` (see the module docs for the precedence).
    pub fn decide(&self, id: &Identity, r: &PolicyRequest<'_>) -> Decision {
        let mut restricting: Option<&Policy> = None;
        let mut cap: Option<Cap> = None;
        let mut decided = false;
        for level in LEVELS {
            let here: Vec<&Policy> = self
                .policies
                .iter()
                .filter(|p| p.applies_at(level, id))
                .collect();
            if here.is_empty() {
                continue;
            }
            if cap.is_none() {
                cap = here
                    .iter()
                    .filter_map(|p| {
                        p.max_tokens.map(|tokens| Cap {
                            tokens,
                            policy: Arc::clone(&p.name),
                            on_over: p.on_max_tokens,
                        })
                    })
                    .max_by_key(|c| c.tokens);
            }
            if decided {
                continue;
            }
            if let Some(p) = here.iter().find(|p| p.denies(r)) {
                return Decision::Deny {
                    policy: Arc::clone(&p.name),
                    reason: format!(
                        "the model `{}` (provider {}) is denied by policy `{}`",
                        r.model, r.provider, p.name
                    ),
                };
            }
            if here.iter().any(|p| p.allows(r)) {
                decided = true;
                continue;
            }
            if restricting.is_none() {
                restricting = here.iter().copied().find(|p| p.has_allow_list());
            }
        }
        match restricting {
            Some(p) if !decided => Decision::Deny {
                policy: Arc::clone(&p.name),
                reason: format!(
                    "the model `{}` (provider {}) is not among the models allowed by policy `{}`",
                    r.model, r.provider, p.name
                ),
            },
            _ => Decision::Allow { max_tokens: cap },
        }
    }

    /// Whether `id` may use `model` at all (for filtering `GET /v1/models`).
    pub fn permits(&self, id: &Identity, r: &PolicyRequest<'_>) -> bool {
        matches!(self.decide(id, r), Decision::Allow { .. })
    }
}

/// Identities for unit tests across the crate (policies, budgets).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{Identity, IdentityKind};

    pub(crate) fn user(sub: &str, groups: &[&str]) -> Identity {
        Identity {
            kind: IdentityKind::User,
            subject: Arc::from(sub),
            email: Some(Arc::from(format!("{sub}@example.com").as_str())),
            groups: groups.iter().map(|g| Arc::from(*g)).collect(),
            source: Arc::from("okta"),
            token_id: None,
            attributes: Arc::from(Vec::new()),
        }
    }

    pub(crate) fn service(name: &str, team: &str) -> Identity {
        Identity {
            kind: IdentityKind::Service,
            subject: Arc::from(name),
            email: None,
            groups: Arc::from(vec![Arc::from(team)]),
            source: Arc::from("service-token"),
            token_id: Some(Arc::from("st_1")),
            attributes: Arc::from(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::identity::testing::{service, user};

    fn set(toml_text: &str) -> PolicySet {
        #[derive(Deserialize)]
        struct F {
            policies: Vec<RawPolicy>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        PolicySet::from_raw(f.policies).unwrap()
    }

    fn req(model: &str) -> PolicyRequest<'_> {
        PolicyRequest {
            model,
            upstream_model: None,
            canonical_model: None,
            provider: "openai",
        }
    }

    fn cap(tokens: u64, policy: &str) -> Cap {
        Cap {
            tokens,
            policy: Arc::from(policy),
            on_over: OnMaxTokens::Lower,
        }
    }

    fn denied_by(d: &Decision) -> Option<&str> {
        match d {
            Decision::Deny { policy, .. } => Some(policy),
            Decision::Allow { .. } => None,
        }
    }

    const POLICIES: &str = r#"
        [[policies]]
        name = "everyone"
        default = true
        allow_models = ["gpt-4o-mini", "claude-3-5-haiku*"]
        max_tokens = 1000

        [[policies]]
        name = "ml"
        group = "ml"
        allow_models = ["gpt-4o*", "o1*"]
        deny_models = ["o1-pro*"]
        max_tokens = 8000

        [[policies]]
        name = "research"
        group = "research"
        allow_models = ["o1-pro"]
        max_tokens = 32000

        [[policies]]
        name = "alice"
        user = "alice"
        allow_models = ["o1-pro"]

        [[policies]]
        name = "bob"
        user = "bob@example.com"
        deny_models = ["gpt-4o"]

        [[policies]]
        name = "ci"
        service_token = "ci-bot"
        allow_providers = ["anthropic"]
        max_tokens = 200
        on_max_tokens = "lower"
    "#;

    #[test]
    fn default_policy_allows_only_its_list() {
        let p = set(POLICIES);
        let nobody = user("carol", &[]);
        assert_eq!(
            p.decide(&nobody, &req("gpt-4o-mini")),
            Decision::Allow {
                max_tokens: Some(cap(1000, "everyone"))
            }
        );
        let d = p.decide(&nobody, &req("gpt-4o"));
        assert_eq!(denied_by(&d), Some("everyone"));
        assert!(format!("{d:?}").contains("not among the models allowed"));
    }

    #[test]
    fn a_group_allow_extends_the_default_and_its_cap_wins() {
        let p = set(POLICIES);
        let dev = user("dave", &["ml"]);
        assert_eq!(
            p.decide(&dev, &req("gpt-4o")),
            Decision::Allow {
                max_tokens: Some(cap(8000, "ml"))
            }
        );
    }

    #[test]
    fn deny_beats_allow_at_the_same_level() {
        let p = set(POLICIES);
        // ml allows o1* and denies o1-pro*; research (same level) allows o1-pro: the deny wins.
        let d = p.decide(&user("erin", &["ml", "research"]), &req("o1-pro"));
        assert_eq!(denied_by(&d), Some("ml"));
    }

    #[test]
    fn user_beats_group() {
        let p = set(POLICIES);
        // alice's own allow of o1-pro beats her group's deny.
        assert!(p.permits(&user("alice", &["ml"]), &req("o1-pro")));
        // bob's own deny (matched by email) beats his group's allow.
        let d = p.decide(&user("bob", &["ml"]), &req("gpt-4o"));
        assert_eq!(denied_by(&d), Some("bob"));
        assert!(p.permits(&user("bob", &["ml"]), &req("gpt-4o-mini")));
    }

    #[test]
    fn the_largest_cap_among_groups_and_the_subject_cap_first() {
        let p = set(POLICIES);
        let d = p.decide(&user("frank", &["ml", "research"]), &req("gpt-4o"));
        assert_eq!(
            d,
            Decision::Allow {
                max_tokens: Some(cap(32000, "research"))
            }
        );
        let d = p.decide(
            &service("ci-bot", "platform"),
            &PolicyRequest {
                model: "claude-3-5-sonnet",
                upstream_model: None,
                canonical_model: None,
                provider: "anthropic",
            },
        );
        assert_eq!(
            d,
            Decision::Allow {
                max_tokens: Some(cap(200, "ci"))
            }
        );
    }

    #[test]
    fn service_tokens_match_by_name_and_team() {
        let p = set(POLICIES);
        // ci-bot may use anthropic (its own policy) but not gpt-4o (default's list, no own allow).
        let ci = service("ci-bot", "platform");
        assert!(p.permits(
            &ci,
            &PolicyRequest {
                model: "claude-3-5-sonnet",
                upstream_model: None,
                canonical_model: None,
                provider: "anthropic"
            }
        ));
        assert_eq!(denied_by(&p.decide(&ci, &req("gpt-4o"))), Some("ci"));
        // A token of team "ml" gets the ml group policy.
        assert!(p.permits(&service("trainer", "ml"), &req("gpt-4o")));
        // A user named like the token does not get the token's policy.
        assert_eq!(
            denied_by(&p.decide(&user("ci-bot", &[]), &req("claude-3-5-sonnet"))),
            Some("everyone")
        );
    }

    #[test]
    fn an_alias_cannot_dodge_a_deny_on_the_upstream_model() {
        let p = set(POLICIES);
        let r = PolicyRequest {
            model: "fast",
            upstream_model: Some("o1-pro-2025"),
            canonical_model: None,
            provider: "openai",
        };
        assert_eq!(denied_by(&p.decide(&user("gail", &["ml"]), &r)), Some("ml"));
    }

    #[test]
    fn a_name_covers_its_dated_snapshots_through_the_canonical_name() {
        let p = set(POLICIES);
        // bob denies gpt-4o; the dated snapshot resolves (price sheet) to gpt-4o.
        let dated = PolicyRequest {
            model: "gpt-4o-2024-08-06",
            upstream_model: None,
            canonical_model: Some("gpt-4o"),
            provider: "openai",
        };
        assert_eq!(
            denied_by(&p.decide(&user("bob", &["ml"]), &dated)),
            Some("bob")
        );
        // Without the canonical name the snapshot would escape the deny (the bug this closes).
        let bare = PolicyRequest {
            canonical_model: None,
            ..dated
        };
        assert!(p.permits(&user("bob", &["ml"]), &bare));
        // An alias route whose upstream is a snapshot: the canonical name of the billed model counts.
        let alias = PolicyRequest {
            model: "fast",
            upstream_model: Some("gpt-4o-2024-11-20"),
            canonical_model: Some("gpt-4o"),
            provider: "openai",
        };
        assert_eq!(
            denied_by(&p.decide(&user("bob", &["ml"]), &alias)),
            Some("bob")
        );
        // Allows follow the same names: everyone's gpt-4o-mini allow covers its dated snapshot.
        let mini = PolicyRequest {
            model: "gpt-4o-mini-2024-07-18",
            upstream_model: None,
            canonical_model: Some("gpt-4o-mini"),
            provider: "openai",
        };
        assert!(p.permits(&user("carol", &[]), &mini));
    }

    #[test]
    fn no_policies_allow_everything_uncapped() {
        let p = PolicySet::default();
        assert_eq!(
            p.decide(&Identity::anonymous(), &req("anything")),
            Decision::Allow { max_tokens: None }
        );
    }

    #[test]
    fn bad_policies_are_reported_by_field() {
        let raw = vec![
            RawPolicy {
                name: "x".into(),
                user: Some("a".into()),
                group: Some("b".into()),
                ..RawPolicy::default()
            },
            RawPolicy {
                name: "x".into(),
                default: Some(true),
                allow_models: vec!["[".into()],
                max_tokens: Some(0),
                ..RawPolicy::default()
            },
        ];
        let e = PolicySet::from_raw(raw).unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| f.as_str()).collect();
        assert!(fields.contains(&"policies[0].user"), "{e:?}");
        assert!(fields.contains(&"policies[1].name"), "{e:?}");
        assert!(fields.contains(&"policies[1].allow_models[0]"), "{e:?}");
        assert!(fields.contains(&"policies[1].max_tokens"), "{e:?}");
        let raw = vec![
            RawPolicy {
                name: "a".into(),
                default: Some(true),
                max_tokens: Some(10),
                on_max_tokens: Some("truncate".into()),
                ..RawPolicy::default()
            },
            RawPolicy {
                name: "b".into(),
                group: Some("g".into()),
                on_max_tokens: Some("refuse".into()),
                ..RawPolicy::default()
            },
        ];
        let e = PolicySet::from_raw(raw).unwrap_err();
        assert!(
            e.iter()
                .any(|(f, r)| f == "policies[0].on_max_tokens" && r.contains("truncate")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|(f, _)| f == "policies[1].on_max_tokens"),
            "{e:?}"
        );
    }

    #[test]
    fn the_capping_policy_says_whether_a_larger_request_is_lowered_or_refused() {
        let p = set(r#"
            [[policies]]
            name = "everyone"
            default = true
            max_tokens = 4096

            [[policies]]
            name = "strict"
            group = "strict"
            max_tokens = 1000
            on_max_tokens = "refuse"
        "#);
        let over = |id: &Identity| match p.decide(id, &req("gpt-4o")) {
            Decision::Allow {
                max_tokens: Some(c),
            } => (c.tokens, c.on_over),
            other => panic!("{other:?}"),
        };
        assert_eq!(over(&user("carol", &[])), (4096, OnMaxTokens::Lower));
        assert_eq!(over(&user("dan", &["strict"])), (1000, OnMaxTokens::Refuse));
    }
}
