//! Every error answer: an RFC 9457 problem document with a stable `code`.

use serde::{Deserialize, Serialize};

/// A problem document (`application/problem+json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProblemDocument {
    /// `urn:hybridstore:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable across versions: what a client branches on.
    pub code: String,
    /// Members some problems add (`current_version`, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}
