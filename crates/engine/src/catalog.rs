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
/// What a collection with unique indexes follows while the service-wide
/// strategy writes through the cache.
pub const HELD_BACK_ON: Strategy = Strategy::DualWrite;

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
    schema: Option<jsonschema::Validator>,
}

impl Collection {
    /// The strategy this collection follows when the service-wide one is
    /// `service`: its own, if it declares one; the service's, if it can
    /// take it; `dual_write` otherwise (see [`Collection::held_back`]).
    pub fn strategy(&self, service: Strategy) -> Strategy {
        match self.spec.strategy {
            Some(own) => own,
            None if self.refuses(service).is_some() => HELD_BACK_ON,
            None => service,
        }
    }

    /// Why this collection, which follows the service-wide strategy, does
    /// not take `service`: it has unique indexes, which only the durable
    /// tier enforces, and `service` writes through the cache. It then keeps
    /// `HELD_BACK_ON` (`dual_write`), which commits durably first and still reads the
    /// cache.
    pub fn held_back(&self, service: Strategy) -> Option<String> {
        if self.spec.strategy.is_some() {
            return None;
        }
        self.refuses(service).map(|_| {
            format!(
                "unique indexes, which only the durable tier enforces: {HELD_BACK_ON} instead of \
                 the service's {service}"
            )
        })
    }

    /// Why this collection cannot follow `strategy`, if it cannot.
    pub fn refuses(&self, strategy: Strategy) -> Option<String> {
        let through_cache = Plan::of(strategy).write.through_cache();
        (through_cache && !self.spec.unique_indexes.is_empty()).then(|| {
            format!(
                "strategy {strategy} writes through the cache, which cannot enforce unique \
                 indexes; use dual_write or database_first"
            )
        })
    }

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
    /// Compiles the declared collections (the service-wide strategy applies
    /// where a collection does not choose its own and can take it).
    pub fn new(specs: Vec<CollectionSpec>) -> Result<Catalog, CatalogError> {
        let mut collections = BTreeMap::new();
        for spec in specs {
            let problem = |key: &'static str, problem: String| CatalogError {
                collection: spec.name.to_string(),
                key,
                problem,
            };
            if spec.cache_ttl < Duration::from_secs(1) {
                return Err(problem("cache_ttl_secs", "must be at least 1".into()));
            }
            let schema = match &spec.schema {
                None => None,
                Some(schema) => Some(
                    jsonschema::validator_for(schema)
                        .map_err(|err| problem("schema", format!("invalid JSON Schema: {err}")))?,
                ),
            };
            let collection = Collection { spec, schema };
            // A strategy the collection declares must suit it; the
            // service-wide one is taken only where it does (`strategy`).
            let declared = collection.spec.strategy.unwrap_or(Strategy::DualWrite);
            if let Some(refusal) = collection.refuses(declared) {
                return Err(CatalogError {
                    collection: collection.spec.name.to_string(),
                    key: "unique_indexes",
                    problem: refusal,
                });
            }
            collections.insert(collection.spec.name.clone(), collection);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str) -> CollectionSpec {
        CollectionSpec {
            name: CollectionName::parse(name).unwrap(),
            cache_ttl: Duration::from_secs(60),
            record_ttl: None,
            unique_indexes: vec![IndexName::parse("handle").unwrap()],
            schema: None,
            strategy: None,
            private: false,
        }
    }

    fn object(value: serde_json::Value) -> JsonObject {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn index_values_are_the_text_of_scalars() {
        let index = IndexName::parse("handle").unwrap();
        let value = |data| index_value(&object(data), &index).map_err(|_| ());
        assert_eq!(value(json!({"handle": "ada"})), Ok(Some("ada".into())));
        assert_eq!(value(json!({"handle": 42})), Ok(Some("42".into())));
        assert_eq!(value(json!({"handle": true})), Ok(Some("true".into())));
        assert_eq!(value(json!({"handle": null})), Ok(None));
        assert_eq!(value(json!({"other": 1})), Ok(None));
        assert_eq!(value(json!({"handle": [1]})), Err(()));
        assert_eq!(value(json!({"handle": {"a": 1}})), Err(()));
        assert_eq!(value(json!({"handle": "x".repeat(1025)})), Err(()));
    }

    #[test]
    fn a_collection_without_indexes_maintains_none() {
        let mut plain = spec("plain");
        plain.unique_indexes.clear();
        let catalog = Catalog::new(vec![plain]).unwrap();
        let collection = catalog
            .get(&CollectionName::parse("plain").unwrap())
            .unwrap();
        assert!(
            collection
                .index_entries(&object(json!({"handle": "x"})))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn schemas_are_compiled_and_enforced() {
        let mut with_schema = spec("people");
        with_schema.schema = Some(json!({"type": "object", "required": ["handle"]}));
        let catalog = Catalog::new(vec![with_schema]).unwrap();
        let people = catalog
            .get(&CollectionName::parse("people").unwrap())
            .unwrap();
        assert!(people.validate(&object(json!({"handle": "ada"}))).is_ok());
        match people.validate(&object(json!({"name": "ada"}))) {
            Err(Error::SchemaViolation(errors)) => assert!(errors[0].contains("handle")),
            other => panic!("expected a schema violation, got {other:?}"),
        }
    }

    #[test]
    fn configuration_problems_name_the_collection_and_key() {
        let mut bad_schema = spec("people");
        bad_schema.schema = Some(json!({"type": 12}));
        let err = Catalog::new(vec![bad_schema]).err().unwrap();
        assert_eq!((err.collection.as_str(), err.key), ("people", "schema"));

        let mut write_behind = spec("hot");
        write_behind.strategy = Some(Strategy::CacheFirst);
        let err = Catalog::new(vec![write_behind]).err().unwrap();
        assert_eq!(
            (err.collection.as_str(), err.key),
            ("hot", "unique_indexes")
        );

        // Following a service strategy it cannot take is no error: the
        // collection is held back on dual_write, and says why.
        let catalog = Catalog::new(vec![spec("any")]).unwrap();
        let any = catalog.get(&CollectionName::parse("any").unwrap()).unwrap();
        assert_eq!(any.strategy(Strategy::RedisOnly), HELD_BACK_ON);
        assert!(
            any.held_back(Strategy::RedisOnly)
                .unwrap()
                .contains("unique indexes")
        );
        assert_eq!(
            any.strategy(Strategy::DatabaseFirst),
            Strategy::DatabaseFirst
        );
        assert_eq!(any.held_back(Strategy::DatabaseFirst), None);
    }

    #[test]
    fn unknown_collections_and_indexes_are_errors() {
        let catalog = Catalog::new(vec![spec("people")]).unwrap();
        assert!(matches!(
            catalog.get(&CollectionName::parse("robots").unwrap()),
            Err(Error::UnknownCollection(_))
        ));
        let people = catalog
            .get(&CollectionName::parse("people").unwrap())
            .unwrap();
        assert!(people.index("handle").is_ok());
        assert!(matches!(people.index("email"), Err(Error::NotFound(_))));
    }
}
