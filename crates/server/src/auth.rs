//! Bearer-token authentication and scopes.
//!
//! Tokens are kept only as SHA-256 digests and a presented token is hashed and
//! compared with every configured digest in constant time, so neither response
//! timing nor a memory dump reveals a token. Tokens never reach a log line.

use hybridstore_core::CollectionName;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::scope::Scope;

/// The kind of access a request needs on a collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Who made a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub name: String,
    pub admin: bool,
    scopes: Vec<Scope>,
}

impl Principal {
    /// Whether it may increment and read usage counters.
    pub fn may_count(&self) -> bool {
        self.admin || self.scopes.contains(&Scope::Counters)
    }

    /// Whether this caller may `access` `collection` (`private`: see
    /// `CollectionSpec::private`).
    pub fn may(&self, access: Access, collection: &CollectionName, private: bool) -> bool {
        self.admin
            || self.scopes.iter().any(|scope| match (scope, access) {
                (Scope::Read(target), Access::Read) | (Scope::Write(target), Access::Write) => {
                    target.covers(collection, private)
                }
                _ => false,
            })
    }
}

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

struct KnownToken {
    digest: TokenDigest,
    principal: Principal,
}

pub struct Authenticator {
    known: Vec<KnownToken>,
}

impl Authenticator {
    /// Built from a validated configuration (scopes parsed when it was
    /// read, and checked against the declared collections).
    pub fn from_config(config: &Config) -> Self {
        let mut known = Vec::with_capacity(config.tokens.len() + 1);
        if let Some(admin) = &config.admin_token {
            known.push(KnownToken {
                digest: digest(admin.expose()),
                principal: Principal {
                    name: "admin".into(),
                    admin: true,
                    scopes: Vec::new(),
                },
            });
        }
        for token in &config.tokens {
            known.push(KnownToken {
                digest: digest(token.token.expose()),
                principal: Principal {
                    name: token.name.clone(),
                    admin: false,
                    scopes: token.scopes.clone(),
                },
            });
        }
        Self { known }
    }

    /// The principal holding `token`, if any. Every known digest is compared,
    /// each in constant time, whatever matches.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        let presented = digest(token);
        let mut found = None;
        for known in &self.known {
            if bool::from(known.digest.ct_eq(&presented)) {
                found = Some(&known.principal);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Target;

    fn name(s: &str) -> CollectionName {
        CollectionName::parse(s).unwrap()
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(Scope::parse("read:*"), Ok(Scope::Read(Target::All)));
        assert_eq!(
            Scope::parse("write:api_keys"),
            Ok(Scope::Write(Target::Collection(name("api_keys"))))
        );
        assert_eq!(Scope::parse("counters"), Ok(Scope::Counters));
        for bad in ["admin", "read", "read:", "read:Bad", "delete:*"] {
            assert!(Scope::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn principals_get_what_their_scopes_say() {
        let principal = Principal {
            name: "relay".into(),
            admin: false,
            scopes: vec![
                Scope::Read(Target::All),
                Scope::Write(Target::Collection(name("api_keys"))),
            ],
        };
        assert!(principal.may(Access::Read, &name("users"), false));
        assert!(principal.may(Access::Write, &name("api_keys"), false));
        assert!(!principal.may(Access::Write, &name("users"), false));
        // `*` does not reach a private collection; a scope naming it does.
        assert!(!principal.may(Access::Read, &name("users"), true));
        let named = Principal {
            name: "hub".into(),
            admin: false,
            scopes: vec![Scope::Read(Target::Collection(name("users")))],
        };
        assert!(named.may(Access::Read, &name("users"), true));
    }
}
