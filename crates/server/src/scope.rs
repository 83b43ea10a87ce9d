//! Token scopes: what a client token may do.
//!
//! A scope is parsed once, when the configuration is read (a malformed one
//! stops the start, naming its key), and used as this type from then on.

use std::fmt;

use hybridstore_core::CollectionName;
use serde::Deserialize;

/// What a scope grants on collections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    Collection(CollectionName),
}

impl Target {
    /// Whether this target reaches `collection`; `*` does not reach a
    /// private one (only a scope that names it does).
    pub fn covers(&self, collection: &CollectionName, private: bool) -> bool {
        match self {
            Target::All => !private,
            Target::Collection(name) => name == collection,
        }
    }
}

/// `read:<collection|*>`, `write:<collection|*>` or `counters`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Scope {
    Read(Target),
    Write(Target),
    Counters,
}

impl Scope {
    /// The one collection this scope is about, if it names one.
    pub fn collection(&self) -> Option<&CollectionName> {
        match self {
            Scope::Read(Target::Collection(name)) | Scope::Write(Target::Collection(name)) => {
                Some(name)
            }
            _ => None,
        }
    }

    /// Parses `read:<collection|*>`, `write:<collection|*>` or `counters`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        if text == "counters" {
            return Ok(Scope::Counters);
        }
        let (kind, target) = text.split_once(':').ok_or_else(|| {
            format!("unknown scope {text:?}: expected read:<collection|*>, write:<collection|*> or counters")
        })?;
        let target = match target {
            "*" => Target::All,
            name => Target::Collection(
                CollectionName::parse(name).map_err(|err| format!("scope {text:?}: {err}"))?,
            ),
        };
        match kind {
            "read" => Ok(Scope::Read(target)),
            "write" => Ok(Scope::Write(target)),
            _ => Err(format!(
                "unknown scope {text:?}: expected read:<collection|*>, write:<collection|*> or counters"
            )),
        }
    }
}

impl TryFrom<String> for Scope {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Scope::parse(&text)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, target) = match self {
            Scope::Counters => return f.write_str("counters"),
            Scope::Read(target) => ("read", target),
            Scope::Write(target) => ("write", target),
        };
        match target {
            Target::All => write!(f, "{kind}:*"),
            Target::Collection(name) => write!(f, "{kind}:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_reads_back_as_it_was_written() {
        for text in ["counters", "read:*", "write:api_keys"] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        assert!(Scope::parse("root").is_err());
        assert!(Scope::parse("delete:api_keys").is_err());
    }
}
