//! Declared collections, with their schemas compiled once at start.

use std::collections::BTreeMap;
use std::time::Duration;

use hybridstore_core::{
    CollectionName, CollectionSpec, Error, IndexEntry, IndexName, JsonObject, Strategy,
};
use serde_json::Value;

use crate::strategy::Plan;

/// Longest unique-index value accepted (index entries live in a B-tree).
const MAX_INDEX_VALUE_BYTES: usize = 1024;
/// How many schema errors a response lists at most.
const MAX_SCHEMA_ERRORS: usize = 10;

/// A configuration problem with one collection, naming the config key.
#[derive(Debug, thiserror::Error)]
#[error("collections.{collection}.{key}: {problem}")]
pub struct CatalogError {
    pub collection: String,
    pub key: &'static str,
    pub problem: String,
}

pub struct Collection {
    pub spec: CollectionSpec,
    pub plan: Plan,
    pub strategy: Strategy,
    schema: Option<jsonschema::Validator>,
}

impl Collection {
    /// Checks `data` against the collection's schema.
    pub fn validate(&self, data: &JsonObject) -> Result<(), Error> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let value = Value::Object(data.clone());
        let errors: Vec<String> = schema
            .iter_errors(&value)
            .take(MAX_SCHEMA_ERRORS)
            .map(|err| {
                let path = err.instance_path().to_string();
                if path.is_empty() {
                    err.to_string()
                } else {
                    format!("{path}: {err}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::SchemaViolation(errors))
        }
    }

    /// The index entries `data` produces, or `None` when the collection has no
    /// unique index. A missing or `null` field produces no entry (like SQL, many
    /// records may lack a value); strings, numbers and booleans are indexed by
    /// their text; anything else is a schema violation.
    pub fn index_entries(&self, data: &JsonObject) -> Result<Option<Vec<IndexEntry>>, Error> {
        if self.spec.unique_indexes.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(self.spec.unique_indexes.len());
        for index in &self.spec.unique_indexes {
            if let Some(value) = index_value(data, index)? {
                entries.push(IndexEntry {
                    index: index.clone(),
                    value,
                });
            }
        }
        Ok(Some(entries))
    }

    pub fn index(&self, name: &str) -> Result<&IndexName, Error> {
        self.spec
            .unique_indexes
            .iter()
            .find(|index| index.as_str() == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "collection {} has no unique index {name:?}",
                    self.spec.name
                ))
            })
    }
}

/// The text under which `data` is indexed by `index`.
pub(crate) fn index_value(data: &JsonObject, index: &IndexName) -> Result<Option<String>, Error> {
    let text = match data.get(index.as_str()) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(_) => {
            return Err(Error::SchemaViolation(vec![format!(
                "/{index}: a unique index field must be a string, number or boolean"
            )]));
        }
    };
    if text.len() > MAX_INDEX_VALUE_BYTES {
        return Err(Error::SchemaViolation(vec![format!(
            "/{index}: a unique index value may be at most {MAX_INDEX_VALUE_BYTES} bytes"
        )]));
    }
    Ok(Some(text))
}

/// Every declared collection.
pub struct Catalog {
    collections: BTreeMap<CollectionName, Collection>,
}

impl Catalog {
    /// Compiles the declared collections; `default_strategy` applies where a
    /// collection does not choose its own.
    pub fn new(
        specs: Vec<CollectionSpec>,
        default_strategy: Strategy,
    ) -> Result<Catalog, CatalogError> {
        let mut collections = BTreeMap::new();
        for spec in specs {
            let problem = |key: &'static str, problem: String| CatalogError {
                collection: spec.name.to_string(),
                key,
                problem,
            };
            let strategy = spec.strategy.unwrap_or(default_strategy);
            let plan = Plan::of(strategy).ok_or_else(|| {
                problem(
                    "strategy",
                    format!("strategy {strategy} is not available yet"),
                )
            })?;
            if spec.cache_ttl < Duration::from_secs(1) {
                return Err(problem("cache_ttl", "must be at least 1 second".into()));
            }
            let schema = match &spec.schema {
                None => None,
                Some(schema) => Some(
                    jsonschema::validator_for(schema)
                        .map_err(|err| problem("schema", format!("invalid JSON Schema: {err}")))?,
                ),
            };
            collections.insert(
                spec.name.clone(),
                Collection {
                    spec,
                    plan,
                    strategy,
                    schema,
                },
            );
        }
        Ok(Catalog { collections })
    }

    pub fn get(&self, name: &CollectionName) -> Result<&Collection, Error> {
        self.collections
            .get(name)
            .ok_or_else(|| Error::UnknownCollection(name.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Collection> {
        self.collections.values()
    }
}
