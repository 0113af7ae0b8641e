//! Who calls and what they may do.
//!
//! [`identity`]: the caller ([`Identity`](identity::Identity)) and model policies; [`jwt`]: OIDC JWT
//! verification and signing-key fetching (JWKS, OIDC discovery); [`service_tokens`]: hashed tokens for
//! CI/CD agents; [`login`]: the OAuth device-flow client behind `tollgate login` and `tollgate token`.

pub mod identity;
pub mod jwt;
pub mod login;
pub mod service_tokens;
