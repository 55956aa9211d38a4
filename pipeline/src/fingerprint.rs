//! Stage fingerprints: what a stage's output depends on, hashed, and explained when it changes.
//!
//! A fingerprint covers the kind, its implementation version, the canonical parameters, the
//! state of every file the stage reads and the *content hashes* of its inputs. Using content
//! hashes (not input fingerprints) means a rerun whose output comes out byte-identical does not
//! invalidate anything downstream.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::stage::FileDep;

/// Everything a fingerprint is made of; stored in the manifest so `kiln status` can say what
/// changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FingerprintParts {
    /// Stage kind.
    pub kind: String,
    /// Implementation version of the kind.
    pub version: u32,
    /// Canonical parameters.
    pub params: serde_json::Value,
    /// File path (as written, relative to the pipeline) to its state.
    pub files: BTreeMap<String, String>,
    /// Input stage name to the content hash of its dataset.
    pub inputs: BTreeMap<String, String>,
    /// The pipeline seed, for stages whose output depends on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The `[models.<name>]` tables the stage calls, as canonical JSON (absent for stages that
    /// call no model, so their fingerprints are as before).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, serde_json::Value>,
}

impl FingerprintParts {
    /// The fingerprint: 32 hex digits of BLAKE3 over the canonical JSON of the parts.
    pub fn fingerprint(&self) -> String {
        // serde_json maps are sorted, so key order in the TOML file does not matter.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&bytes).to_hex()[..32].to_string()
    }

    /// Why `self` differs from `old`, one reason per change, in words.
    pub fn changes_from(&self, old: &FingerprintParts) -> Vec<String> {
        let mut why = Vec::new();
        if self.kind != old.kind {
            why.push(format!("kind changed from `{}` to `{}`", old.kind, self.kind));
        }
        if self.version != old.version {
            why.push(format!("implementation version changed from {} to {}", old.version, self.version));
        }
        if self.seed != old.seed {
            why.push("the pipeline seed changed".to_string());
        }
        why.extend(map_changes("parameter", &as_map(&self.params), &as_map(&old.params)));
        why.extend(map_changes("file", &self.files, &old.files));
        why.extend(map_changes("input", &self.inputs, &old.inputs));
        why.extend(map_changes("model", &self.models, &old.models));
        why
    }
}

fn as_map(v: &serde_json::Value) -> BTreeMap<String, String> {
    match v {
        serde_json::Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        _ => BTreeMap::new(),
    }
}

fn map_changes<V: PartialEq>(what: &str, new: &BTreeMap<String, V>, old: &BTreeMap<String, V>) -> Vec<String> {
    let mut why = Vec::new();
    for (k, v) in new {
        match old.get(k) {
            None => why.push(format!("{what} `{k}` added")),
            Some(o) if o != v => why.push(format!("{what} `{k}` changed")),
            _ => {}
        }
    }
    why.extend(old.keys().filter(|k| !new.contains_key(*k)).map(|k| format!("{what} `{k}` removed")));
    why
}

/// The state of each file dependency, keyed by its path relative to `base_dir` when possible.
/// Contents are hashed; data files are described by size and modification time.
pub fn file_states(deps: &[FileDep], base_dir: &Path) -> BTreeMap<String, String> {
    deps.iter()
        .map(|dep| {
            let hash = |bytes: &[u8]| blake3::hash(bytes).to_hex()[..32].to_string();
            let shown = |p: &Path| p.strip_prefix(base_dir).unwrap_or(p).display().to_string();
            let missing = |_| "missing".to_string();
            match dep {
                FileDep::Contents(p) => (shown(p), std::fs::read(p).map(|b| hash(&b)).unwrap_or_else(missing)),
                FileDep::Stat(p) => (shown(p), std::fs::metadata(p).map(|m| stat_state(&m)).unwrap_or_else(missing)),
                FileDep::Builtin(name, contents) => (format!("(built-in) {name}"), hash(contents.as_bytes())),
            }
        })
        .collect()
}

fn stat_state(m: &std::fs::Metadata) -> String {
    let mtime =
        m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{} bytes, mtime {mtime}", m.len())
}

/// Parts of a version-1 stage with `params` and nothing else, for tests.
#[cfg(test)]
pub(crate) fn parts_with(params: serde_json::Value) -> FingerprintParts {
    FingerprintParts {
        kind: "sql".into(),
        version: 1,
        params,
        files: BTreeMap::new(),
        inputs: BTreeMap::new(),
        seed: None,
        models: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(params: serde_json::Value) -> FingerprintParts {
        parts_with(params)
    }

    #[test]
    fn key_order_does_not_matter() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        assert_eq!(parts(a).fingerprint(), parts(b).fingerprint());
    }

    #[test]
    fn changes_name_the_parameter() {
        let old = parts(serde_json::json!({"query": "SELECT 1", "x": 1}));
        let new = parts(serde_json::json!({"query": "SELECT 2", "y": 1}));
        assert_ne!(old.fingerprint(), new.fingerprint());
        assert_eq!(
            new.changes_from(&old),
            vec!["parameter `query` changed", "parameter `y` added", "parameter `x` removed"]
        );
    }
}
