//! Validated names.
//!
//! Names end up in SQL parameters, Redis keys, URLs and logs. Validating them once,
//! at the edge, into types that cannot hold anything else means no later layer has
//! to think about escaping, and a bad name is always the same `invalid_name` error.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A name that did not match its rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {value:?}: must match {rule}")]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
    pub rule: &'static str,
}

const COLLECTION_RULE: &str = "[a-z][a-z0-9_]{0,62}";
const ID_RULE: &str = "[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}";

/// The rules as anchored regular expressions, for documents that describe
/// the API (the OpenAPI document): collection, index and field names; ids
/// and counter scopes; id prefixes (any leading part of an id).
pub const NAME_PATTERN: &str = "^[a-z][a-z0-9_]{0,62}$";
pub const ID_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}$";
pub const ID_PREFIX_PATTERN: &str = "^([A-Za-z0-9][A-Za-z0-9._:@-]{0,254})?$";

fn is_lower_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

fn is_id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-')
}

fn is_id(s: &str) -> bool {
    let bytes = s.as_bytes();
    (1..=255).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..].iter().all(|b| is_id_char(*b))
}

/// A list prefix is any leading part of a valid id (so it may be empty).
pub fn validate_id_prefix(prefix: &str) -> Result<(), NameError> {
    let ok = prefix.len() <= 255
        && prefix.bytes().all(is_id_char)
        && prefix
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind: "id prefix",
            value: prefix.to_owned(),
            rule: ID_RULE,
        })
    }
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path, $rule:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, NameError> {
                if $check(value) {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(NameError { kind: $kind, value: value.to_owned(), rule: $rule })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        /// Ordered and hashed as its text, so maps keyed by it can be
        /// looked up and ranged by `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

validated_name!(
    /// A collection name: `[a-z][a-z0-9_]{0,62}`.
    CollectionName, "collection", is_lower_name, COLLECTION_RULE
);
validated_name!(
    /// A record id: `[A-Za-z0-9][A-Za-z0-9._:@-]{0,254}`.
    RecordId, "id", is_id, ID_RULE
);
validated_name!(
    /// A unique index, named after the top-level data field it indexes.
    IndexName, "index", is_lower_name, COLLECTION_RULE
);

validated_name!(
    /// A counter scope, e.g. `usage:key_123:model:sonnet`: the id rule.
    CounterScope, "scope", is_id, ID_RULE
);
validated_name!(
    /// A counter field (`requests`, `cost_usd`): `[a-z][a-z0-9_]{0,62}`.
    FieldName, "field", is_lower_name, COLLECTION_RULE
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names() {
        assert!(CollectionName::parse("api_keys").is_ok());
        assert!(CollectionName::parse(&"a".repeat(63)).is_ok());
        for bad in ["", "Api", "1abc", "a-b", "a b", &"a".repeat(64)] {
            assert!(CollectionName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn record_ids() {
        for good in ["k1", "user@example.com", "usage:key_1:model.x-y", "A"] {
            assert!(RecordId::parse(good).is_ok(), "{good:?} rejected");
        }
        assert!(RecordId::parse(&"a".repeat(255)).is_ok());
        for bad in ["", ".a", "-a", "a/b", "a b", "ü", &"a".repeat(256)] {
            assert!(RecordId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn id_prefixes() {
        assert!(validate_id_prefix("").is_ok());
        assert!(validate_id_prefix("user:").is_ok());
        assert!(validate_id_prefix(":x").is_err());
        assert!(validate_id_prefix("a/").is_err());
    }

    #[test]
    fn deserialize_validates() {
        let ok: Result<CollectionName, _> = serde_json::from_str("\"users\"");
        assert!(ok.is_ok());
        let bad: Result<CollectionName, _> = serde_json::from_str("\"Users\"");
        assert!(bad.is_err());
    }
}
