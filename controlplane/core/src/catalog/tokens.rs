//! Service tokens made through the control plane: the [`StoredToken`] spec a catalog object of kind
//! `service_token` holds (a hash, never the secret), minting, rotation with an overlap window, and the
//! records the data plane's token set and the admin server's caller check are built from.
//!
//! A token with a [`Role`] is an admin token: it calls the control plane and is refused by the data plane
//! (it is never put in the data plane's set), and a data-plane token (no role) is refused by the control
//! plane, so neither is ever accepted by the other by accident.
//!
//! Rotation: the new secret's hash replaces `hash`; the old one moves to `previous` with an end time, and
//! keeps working until then (both are in the set), so callers can be moved over without an outage.
//!
//! Fails: [`TokenStoreError`] for names, teams, attributes, lifetimes and the random source. Cost: control
//! side only.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::object::Role;
use crate::auth::service_tokens::{
    self, mint_secret, new_id, Secret, ServiceToken, TokenStatus, TokenStoreError,
};

/// A rotated-out hash and the moment it stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Previous {
    pub hash: String,
    pub until: Timestamp,
}

/// The spec of a `service_token` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredToken {
    pub id: String,
    pub team: String,
    /// Lowercase hex SHA-256 of the token string.
    pub hash: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Present on admin tokens only.
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub previous: Option<Previous>,
    pub rotated_at: Option<Timestamp>,
}

impl StoredToken {
    /// Mints a token: the spec to store and the one copy of its secret.
    pub fn mint(
        name: &str,
        team: &str,
        expires_at: Option<Timestamp>,
        attributes: BTreeMap<String, String>,
        role: Option<Role>,
    ) -> Result<(StoredToken, Secret), TokenStoreError> {
        service_tokens::check_fields(name, team, &attributes)?;
        let now = Timestamp::now();
        if let Some(e) = expires_at {
            if e <= now {
                return Err(TokenStoreError::ExpiryInPast(e));
            }
        }
        let (secret, hash) = mint_secret()?;
        Ok((
            StoredToken {
                id: new_id()?,
                team: team.to_owned(),
                hash,
                created_at: now,
                expires_at,
                revoked_at: None,
                attributes,
                role,
                previous: None,
                rotated_at: None,
            },
            secret,
        ))
    }

    /// A new secret for this token; the old one keeps working for `overlap` (zero: stops at once).
    pub fn rotate(
        &self,
        overlap: jiff::SignedDuration,
    ) -> Result<(StoredToken, Secret), TokenStoreError> {
        let now = Timestamp::now();
        let (secret, hash) = mint_secret()?;
        let mut next = self.clone();
        next.previous = Some(Previous {
            hash: std::mem::replace(&mut next.hash, hash),
            until: now.checked_add(overlap).unwrap_or(now),
        });
        next.rotated_at = Some(now);
        Ok((next, secret))
    }

    /// The record as a [`ServiceToken`] under `name`, for lookups.
    pub fn record(&self, name: &str) -> ServiceToken {
        ServiceToken {
            id: self.id.clone(),
            name: name.to_owned(),
            team: self.team.clone(),
            hash: self.hash.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            attributes: self.attributes.clone(),
        }
    }

    /// Every record a lookup needs: the current hash, and the previous one until its end (or the token's
    /// own expiry, whichever is first).
    pub fn records(&self, name: &str) -> Vec<ServiceToken> {
        let mut out = vec![self.record(name)];
        if let Some(p) = &self.previous {
            let mut old = self.record(name);
            old.hash = p.hash.clone();
            old.expires_at = Some(match self.expires_at {
                Some(e) if e < p.until => e,
                _ => p.until,
            });
            out.push(old);
        }
        out
    }

    pub fn status(&self, name: &str, now: Timestamp) -> TokenStatus {
        self.record(name).status(now)
    }

    /// What the API shows: everything but the hashes.
    pub fn public(&self, name: &str, now: Timestamp) -> serde_json::Value {
        serde_json::json!({
            "name": name,
            "id": self.id,
            "team": self.team,
            "status": self.status(name, now).as_str(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "rotated_at": self.rotated_at,
            "previous_valid_until": self.previous.as_ref().map(|p| p.until),
            "attributes": self.attributes,
            "role": self.role,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::auth::service_tokens::ServiceTokenSet;

    #[test]
    fn a_rotated_token_works_with_both_secrets_until_the_overlap_ends() {
        let (t, old) = StoredToken::mint("ci", "platform", None, BTreeMap::new(), None).unwrap();
        let (r, new) = t.rotate(jiff::SignedDuration::from_secs(60)).unwrap();
        let set = ServiceTokenSet::default().with(&r.records("ci")).unwrap();
        let now = Timestamp::now();
        assert_eq!(&*set.identify(new.expose(), now).unwrap().subject, "ci");
        assert_eq!(&*set.identify(old.expose(), now).unwrap().subject, "ci");
        let later = now
            .checked_add(jiff::SignedDuration::from_secs(61))
            .unwrap();
        assert!(set.identify(old.expose(), later).is_err());
        assert!(set.identify(new.expose(), later).is_ok());
        // Nothing shown by the API holds a hash.
        let shown = r.public("ci", now).to_string();
        assert!(
            !shown.contains(&r.hash) && !shown.contains(&t.hash),
            "{shown}"
        );
    }

    #[test]
    fn bad_names_are_refused_as_in_the_file_store() {
        assert!(StoredToken::mint("has space", "t", None, BTreeMap::new(), None).is_err());
        assert!(StoredToken::mint("ok", "", None, BTreeMap::new(), None).is_err());
    }
}
