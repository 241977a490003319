//! Stage keys: blake3 over a canonical, versioned record of everything a stage's result depends
//! on. The record is kept with the result so that a rerun can say what changed.

use std::collections::BTreeMap;

use autoscale_cache::{ActionKey, ArtifactDigest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bumped when the key record's meaning changes; every key changes with it.
pub const CACHE_SCHEMA: u32 = 1;

/// What a stage key is the hash of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    /// The libraries of [`crate::StageKind::implementation`]; absent when no library shapes
    /// the kind's results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implementation: Option<String>,
    /// The device class and precision of [`crate::StageKind::device_identity`]; absent for
    /// kinds whose results do not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub params: Value,
    pub env: BTreeMap<String, String>,
    /// Input name to the content digest of what it points at (not the upstream's key, so an
    /// upstream rerun that makes the same bytes leaves this stage cached).
    pub inputs: BTreeMap<String, ArtifactDigest>,
}

impl KeyRecord {
    pub fn key(&self) -> ActionKey {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"autoscale-stage-key\n");
        hasher.update(canonical_json(&self.to_value()).as_bytes());
        hasher.finalize().into()
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Why `self` differs from an earlier record of the same stage, one line per change.
    pub fn changes_since(&self, old: &KeyRecord) -> Vec<String> {
        let mut reasons = Vec::new();
        if old.schema != self.schema {
            reasons.push(format!(
                "cache schema changed {} -> {}",
                old.schema, self.schema
            ));
        }
        if old.kind != self.kind {
            reasons.push(format!("kind changed `{}` -> `{}`", old.kind, self.kind));
        } else if old.kind_version != self.kind_version {
            reasons.push(format!(
                "implementation of `{}` changed: version {} -> {}",
                self.kind, old.kind_version, self.kind_version
            ));
        }
        if old.kind == self.kind && old.implementation != self.implementation {
            let show = |i: &Option<String>| i.clone().unwrap_or_else(|| "none".into());
            reasons.push(format!(
                "implementation of `{}` changed: {} -> {}",
                self.kind,
                show(&old.implementation),
                show(&self.implementation)
            ));
        }
        if old.device != self.device {
            let show = |d: &Option<String>| d.clone().unwrap_or_else(|| "none".into());
            reasons.push(format!(
                "device changed: {} -> {}",
                show(&old.device),
                show(&self.device)
            ));
        }
        let mut old_leaves = BTreeMap::new();
        let mut new_leaves = BTreeMap::new();
        flatten("", &old.params, &mut old_leaves);
        flatten("", &self.params, &mut new_leaves);
        diff_maps("param", &old_leaves, &new_leaves, &mut reasons, short);
        diff_maps("env", &old.env, &self.env, &mut reasons, |v| {
            format!("{v:?}")
        });
        for (name, digest) in &self.inputs {
            match old.inputs.get(name) {
                None => reasons.push(format!("input `{name}` added")),
                Some(d) if d != digest => reasons.push(format!("input `{name}` changed")),
                _ => {}
            }
        }
        for name in old.inputs.keys().filter(|n| !self.inputs.contains_key(*n)) {
            reasons.push(format!("input `{name}` removed"));
        }
        reasons
    }
}

fn diff_maps<V: PartialEq>(
    what: &str,
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
    reasons: &mut Vec<String>,
    show: impl Fn(&V) -> String,
) {
    for (k, v) in new {
        match old.get(k) {
            None => reasons.push(format!("{what} {k} added = {}", show(v))),
            Some(o) if o != v => {
                reasons.push(format!("{what} {k} changed {} -> {}", show(o), show(v)))
            }
            _ => {}
        }
    }
    for (k, v) in old {
        if !new.contains_key(k) {
            reasons.push(format!("{what} {k} removed (was {})", show(v)));
        }
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// A value as a person reads it in one line.
fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s
    }
}

/// JSON with object keys sorted and no whitespace: one byte string per value, whatever the
/// map order serde_json was built with.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The digest of a fan-out group input: its members' ids and output digests.
pub fn group_digest<'a>(
    members: impl IntoIterator<Item = (&'a str, ArtifactDigest)>,
) -> ArtifactDigest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"autoscale-group\n");
    for (id, digest) in members {
        hasher.update(id.as_bytes());
        hasher.update(b"\0");
        hasher.update(digest.as_bytes());
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(params: Value) -> KeyRecord {
        KeyRecord {
            schema: CACHE_SCHEMA,
            kind: "command".into(),
            kind_version: 1,
            implementation: None,
            device: None,
            params,
            env: BTreeMap::new(),
            inputs: BTreeMap::new(),
        }
    }

    #[test]
    fn key_ignores_map_order_but_not_values() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": 3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"x": 3, "y": 2}, "b": 1}"#).unwrap();
        assert_eq!(record(a.clone()).key(), record(b).key());
        assert_ne!(
            record(a).key(),
            record(json!({"a": {"x": 3, "y": 2}, "b": 2})).key()
        );
        assert_eq!(
            canonical_json(&json!({"z": [1, {"b": 2, "a": 1}]})),
            r#"{"z":[1,{"a":1,"b":2}]}"#
        );
    }

    #[test]
    fn changes_name_the_param_and_input() {
        let mut old = record(json!({"lr": 3e-4, "steps": 10}));
        old.inputs
            .insert("shards".into(), ArtifactDigest::from(blake3::hash(b"a")));
        let mut new = record(json!({"lr": 6e-4, "steps": 10}));
        new.inputs
            .insert("shards".into(), ArtifactDigest::from(blake3::hash(b"b")));
        let reasons = new.changes_since(&old);
        assert_eq!(
            reasons,
            vec![
                "param lr changed 0.0003 -> 0.0006",
                "input `shards` changed"
            ]
        );
    }

    #[test]
    fn an_implementation_identity_is_keyed_and_explained_and_absent_ones_keep_old_keys() {
        let plain = record(json!({"lr": 1}));
        // Kinds without one keep the key they had before the field existed.
        let value = plain.to_value();
        assert!(value.get("implementation").is_none(), "{value}");
        let mut a = plain.clone();
        a.implementation = Some("tch 0.26.0, libtorch 2.13.0".into());
        let mut b = plain.clone();
        b.implementation = Some("tch 0.26.0, libtorch 2.14.0".into());
        assert_ne!(a.key(), plain.key());
        assert_ne!(a.key(), b.key());
        assert_eq!(
            b.changes_since(&a),
            vec![
                "implementation of `command` changed: tch 0.26.0, libtorch 2.13.0 -> tch 0.26.0, libtorch 2.14.0"
            ]
        );
    }

    /// A key is a function of its record alone: no build, version or path of this binary
    /// goes into it, so a new `autoscale` (an engine or CLI edit) serves every existing result.
    /// If this fails, the key derivation changed and every cache in the world is invalidated:
    /// that needs a `CACHE_SCHEMA` bump and a line in the changelog, not a new literal here.
    #[test]
    fn a_key_is_a_fixed_function_of_its_record() {
        let mut r = record(json!({"cmd": "echo hi", "lr": 0.5}));
        r.inputs
            .insert("data".into(), ArtifactDigest::from(blake3::hash(b"data")));
        assert_eq!(
            r.key().to_hex(),
            "69950764c50505f8f059eeda47ddebd89cdfca4cdc73aa4abbae02258d832aa0"
        );
    }
}
