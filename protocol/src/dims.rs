//! Dimensions: what a node offers, what a job requires, and the pure function between them.
//!
//! A node describes itself as key -> values (`os: [Linux, Ubuntu-24.04]`, `pool: [ci]`). A job
//! requires, for each key it names, one of a set of allowed values: AND across keys, OR within
//! one key, as in Swarming's `a|b`. The `pool` key is required and takes exactly one value, so a
//! job never crosses a trust boundary by alternation. [`Requirements::check`] decides one node;
//! [`explain`] looks at every node a submitter knows of and says why none fits ("no node has
//! os=Mac"), which is what a user sees next to a pending job.
//!
//! This module owns validation of keys and values. It does not know about trust (see
//! [`crate::worker::TrustPolicy`]) or free slots.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The required key naming the pool, the unit of trust and capacity.
pub const POOL: &str = "pool";
/// The key a node gives its slot count under (shards it runs at once), so a submitter can size
/// a job to the slots that match (`grid submit --shards auto`). The node sets it; it cannot be
/// given with `--dimension`.
pub const SLOTS: &str = "slots";
/// The keys whose values form a node's platform class (see [`Dimensions::platform_class`]).
pub const PLATFORM_KEYS: [&str; 2] = ["os", "cpu"];
/// Most keys in a node's dimensions or a job's requirements.
pub const MAX_DIMENSION_KEYS: usize = 32;
/// Most values a node lists for one key.
pub const MAX_NODE_VALUES: usize = 32;
/// Most alternatives a job allows for one key.
pub const MAX_ALTERNATIVES: usize = 8;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;
/// Most bytes of keys and values in one set of dimensions or requirements, so that claims and
/// announcements that carry them stay within their frame limits.
pub const MAX_DIMENSIONS_BYTES: usize = 8192;

/// Why dimensions or requirements are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DimensionError {
    /// More than [`MAX_DIMENSION_KEYS`] keys.
    #[error("{0} dimension keys; the limit is {MAX_DIMENSION_KEYS}")]
    TooManyKeys(usize),
    /// Too many values for one key.
    #[error("dimension {key:?} has {count} values; the limit is {limit}")]
    TooManyValues {
        /// The key.
        key: String,
        /// Values given.
        count: usize,
        /// The limit that applies.
        limit: usize,
    },
    /// A key that is empty, too long, or uses characters outside `[A-Za-z0-9_.-]`.
    #[error(
        "dimension key {0:?} is not valid (1-64 of A-Z a-z 0-9 _ . -, not starting with a digit)"
    )]
    BadKey(String),
    /// A value that is empty, too long, or holds a control character or `|`.
    #[error(
        "dimension {key:?} value {value:?} is not valid (1-256 bytes, no control characters or '|')"
    )]
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A key with no values.
    #[error("dimension {0:?} has no values")]
    NoValues(String),
    /// More than [`MAX_DIMENSIONS_BYTES`] of keys and values in all.
    #[error("dimensions hold {0} bytes of keys and values; the limit is {MAX_DIMENSIONS_BYTES}")]
    TooLarge(usize),
    /// A job without a `pool`.
    #[error("a job must require exactly one pool (dimension \"pool\")")]
    NoPool,
    /// A job whose `pool` has alternatives.
    #[error("a job must require exactly one pool, not {0}")]
    PoolAlternatives(usize),
}

fn valid_key(k: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    !k.is_empty()
        && k.len() <= MAX_KEY_BYTES
        && k.chars().all(ok_char)
        && !k.starts_with(|c: char| c.is_ascii_digit())
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE_BYTES && !v.chars().any(|c| c.is_control() || c == '|')
}

fn validate_map(
    map: &BTreeMap<String, BTreeSet<String>>,
    max_values: usize,
) -> Result<(), DimensionError> {
    if map.len() > MAX_DIMENSION_KEYS {
        return Err(DimensionError::TooManyKeys(map.len()));
    }
    let bytes: usize =
        map.iter().map(|(k, vs)| k.len() + vs.iter().map(String::len).sum::<usize>()).sum();
    if bytes > MAX_DIMENSIONS_BYTES {
        return Err(DimensionError::TooLarge(bytes));
    }
    for (k, vs) in map {
        if !valid_key(k) {
            return Err(DimensionError::BadKey(k.clone()));
        }
        if vs.is_empty() {
            return Err(DimensionError::NoValues(k.clone()));
        }
        if vs.len() > max_values {
            return Err(DimensionError::TooManyValues {
                key: k.clone(),
                count: vs.len(),
                limit: max_values,
            });
        }
        if let Some(v) = vs.iter().find(|v| !valid_value(v)) {
            return Err(DimensionError::BadValue { key: k.clone(), value: v.clone() });
        }
    }
    Ok(())
}

/// What a node offers: key -> every value it has for that key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Dimensions(pub BTreeMap<String, BTreeSet<String>>);

impl Dimensions {
    /// No dimensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `value` to `key` (builder style).
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.0.entry(key.to_string()).or_default().insert(value.to_string());
        self
    }

    /// Checks keys, values and counts against the limits of this module.
    pub fn validate(&self) -> Result<(), DimensionError> {
        validate_map(&self.0, MAX_NODE_VALUES)
    }

    /// The node's values for `key`; empty if it has none.
    pub fn values(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0.get(key).into_iter().flatten().map(String::as_str)
    }

    /// The platform class: the node's values for [`PLATFORM_KEYS`], as one string
    /// (`os=Linux,Ubuntu;cpu=x86-64`). Replicas of one shard are compared only within a class.
    pub fn platform_class(&self) -> String {
        PLATFORM_KEYS
            .iter()
            .map(|k| format!("{k}={}", self.values(k).collect::<Vec<_>>().join(",")))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// What a job requires: key -> allowed values (OR); every key must be satisfied (AND).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Requirements(pub BTreeMap<String, BTreeSet<String>>);

/// Why one node does not fit a job: the first unsatisfied key, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// The key.
    #[serde(rename = "k")]
    pub key: String,
    /// The values the job allows.
    #[serde(rename = "w")]
    pub wanted: BTreeSet<String>,
    /// The values the node has (empty when it lacks the key).
    #[serde(rename = "h")]
    pub has: BTreeSet<String>,
}

fn alternatives(values: &BTreeSet<String>) -> String {
    values.iter().map(String::as_str).collect::<Vec<_>>().join("|")
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "needs {}={}", self.key, alternatives(&self.wanted))?;
        if self.has.is_empty() {
            write!(f, ", node has no {}", self.key)
        } else {
            write!(f, ", node has {}={}", self.key, alternatives(&self.has))
        }
    }
}

impl Requirements {
    /// Requirements with only a pool.
    pub fn in_pool(pool: &str) -> Self {
        Requirements(BTreeMap::new()).with(POOL, &[pool])
    }

    /// Requires `key` to be one of `values` (builder style; replaces earlier values of `key`).
    pub fn with(mut self, key: &str, values: &[&str]) -> Self {
        self.0.insert(key.to_string(), values.iter().map(|v| v.to_string()).collect());
        self
    }

    /// Checks the limits, and that exactly one pool is named.
    pub fn validate(&self) -> Result<(), DimensionError> {
        validate_map(&self.0, MAX_ALTERNATIVES)?;
        match self.0.get(POOL) {
            None => Err(DimensionError::NoPool),
            Some(p) if p.len() != 1 => Err(DimensionError::PoolAlternatives(p.len())),
            Some(_) => Ok(()),
        }
    }

    /// The pool; empty if the requirements were never validated and lack one.
    pub fn pool(&self) -> &str {
        self.0.get(POOL).and_then(|p| p.iter().next()).map_or("", String::as_str)
    }

    /// Whether `node` satisfies every key; otherwise the first key it does not.
    pub fn check(&self, node: &Dimensions) -> Result<(), Mismatch> {
        for (key, wanted) in &self.0 {
            let has = node.0.get(key);
            let ok = has.is_some_and(|has| wanted.iter().any(|w| has.contains(w)));
            if !ok {
                return Err(Mismatch {
                    key: key.clone(),
                    wanted: wanted.clone(),
                    has: has.cloned().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    /// Whether `node` satisfies every key.
    pub fn matches(&self, node: &Dimensions) -> bool {
        self.check(node).is_ok()
    }

    /// The keys `node` does not satisfy, in key order.
    pub fn unmet<'a>(&'a self, node: &'a Dimensions) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter_map(move |(k, wanted)| {
            let ok = node.0.get(k).is_some_and(|has| wanted.iter().any(|w| has.contains(w)));
            (!ok).then_some(k.as_str())
        })
    }
}

/// Whether any of a set of nodes fits a job, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explanation {
    /// This many nodes fit.
    Matching(usize),
    /// No node is known at all.
    NoNodes,
    /// No known node satisfies `key`, so none can run the job.
    NoNodeHas {
        /// The key nobody satisfies (the first in key order).
        key: String,
        /// The values the job allows for it.
        wanted: BTreeSet<String>,
    },
    /// Every key is satisfied by some node, but no node satisfies all of them.
    NoNodeHasAll {
        /// The keys the closest node (fewest unmet keys, first by dimensions) lacks.
        closest_lacks: Vec<String>,
        /// How many nodes were considered.
        nodes: usize,
    },
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explanation::Matching(1) => write!(f, "1 node matches"),
            Explanation::Matching(n) => write!(f, "{n} nodes match"),
            Explanation::NoNodes => write!(f, "no node is known"),
            Explanation::NoNodeHas { key, wanted } => {
                write!(f, "no node has {key}={}", alternatives(wanted))
            }
            Explanation::NoNodeHasAll { closest_lacks, nodes } => write!(
                f,
                "none of {nodes} nodes has every dimension; the closest lacks {}",
                closest_lacks.join(", ")
            ),
        }
    }
}

/// Explains whether any of `nodes` can run a job requiring `req`. Pure and deterministic: the
/// answer depends only on the set of nodes and their order for ties.
pub fn explain<'a>(
    req: &Requirements,
    nodes: impl IntoIterator<Item = &'a Dimensions>,
) -> Explanation {
    let nodes: Vec<&Dimensions> = nodes.into_iter().collect();
    if nodes.is_empty() {
        return Explanation::NoNodes;
    }
    let matching = nodes.iter().filter(|n| req.matches(n)).count();
    if matching > 0 {
        return Explanation::Matching(matching);
    }
    for (key, wanted) in &req.0 {
        let any = nodes
            .iter()
            .any(|n| n.0.get(key).is_some_and(|has| wanted.iter().any(|w| has.contains(w))));
        if !any {
            return Explanation::NoNodeHas { key: key.clone(), wanted: wanted.clone() };
        }
    }
    let closest = nodes
        .iter()
        .map(|n| req.unmet(n).map(str::to_string).collect::<Vec<_>>())
        .min_by_key(Vec::len)
        .unwrap_or_default();
    Explanation::NoNodeHasAll { closest_lacks: closest, nodes: nodes.len() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn linux() -> Dimensions {
        Dimensions::new()
            .with("os", "Linux")
            .with("os", "Ubuntu-24.04")
            .with("cpu", "x86-64")
            .with("pool", "ci")
    }

    fn mac() -> Dimensions {
        Dimensions::new().with("os", "Mac").with("cpu", "arm64").with("pool", "ci")
    }

    #[test]
    fn and_across_keys_or_within_a_key() {
        let req =
            Requirements::in_pool("ci").with("os", &["Mac", "Linux"]).with("cpu", &["x86-64"]);
        req.validate().unwrap();
        assert!(req.matches(&linux()));
        let err = req.check(&mac()).unwrap_err();
        assert_eq!(err.key, "cpu");
        assert_eq!(err.to_string(), "needs cpu=x86-64, node has cpu=arm64");
        let other_pool = linux();
        let req2 = Requirements::in_pool("release");
        assert_eq!(
            req2.check(&other_pool).unwrap_err().to_string(),
            "needs pool=release, node has pool=ci"
        );
        let bare = Dimensions::new();
        assert_eq!(
            req2.check(&bare).unwrap_err().to_string(),
            "needs pool=release, node has no pool"
        );
    }

    #[test]
    fn requirements_need_exactly_one_pool() {
        let none = Requirements(BTreeMap::new()).with("os", &["Linux"]);
        assert_eq!(none.validate().unwrap_err(), DimensionError::NoPool);
        let two = Requirements(BTreeMap::new()).with("pool", &["a", "b"]);
        assert_eq!(two.validate().unwrap_err(), DimensionError::PoolAlternatives(2));
        assert_eq!(Requirements::in_pool("ci").pool(), "ci");
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let r = Requirements::in_pool("ci").with("1os", &["x"]);
        assert_eq!(r.validate().unwrap_err(), DimensionError::BadKey("1os".into()));
        let r = Requirements::in_pool("ci").with("os", &["a|b"]);
        assert!(matches!(r.validate().unwrap_err(), DimensionError::BadValue { .. }));
        let r = Requirements::in_pool("ci").with("os", &[]);
        assert_eq!(r.validate().unwrap_err(), DimensionError::NoValues("os".into()));
        let many: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let r = Requirements::in_pool("ci").with("os", &many);
        assert!(matches!(
            r.validate().unwrap_err(),
            DimensionError::TooManyValues { count: 9, .. }
        ));
        let mut d = Dimensions::new();
        for i in 0..33 {
            d = d.with(&format!("k{i}"), "v");
        }
        assert_eq!(d.validate().unwrap_err(), DimensionError::TooManyKeys(33));
        linux().validate().unwrap();
        let mut big = Dimensions::new();
        for k in 0..32 {
            for v in 0..2 {
                big = big.with(&format!("k{k}"), &format!("{v}{}", "x".repeat(200)));
            }
        }
        assert!(matches!(big.validate().unwrap_err(), DimensionError::TooLarge(_)));
    }

    #[test]
    fn explanations_name_the_missing_dimension() {
        let req = Requirements::in_pool("ci").with("os", &["Mac"]).with("cpu", &["x86-64"]);
        assert_eq!(explain(&req, []), Explanation::NoNodes);
        let nodes = [linux(), mac()];
        let e = explain(&req, &nodes);
        assert_eq!(e.to_string(), "none of 2 nodes has every dimension; the closest lacks os");
        let req = Requirements::in_pool("ci").with("os", &["Windows"]);
        assert_eq!(explain(&req, &nodes).to_string(), "no node has os=Windows");
        let req = Requirements::in_pool("ci").with("os", &["Mac", "Linux"]);
        assert_eq!(explain(&req, &nodes), Explanation::Matching(2));
        assert_eq!(explain(&req, &nodes).to_string(), "2 nodes match");
    }

    #[test]
    fn platform_class_uses_os_and_cpu_only() {
        assert_eq!(linux().platform_class(), "os=Linux,Ubuntu-24.04;cpu=x86-64");
        assert_eq!(linux().with("gpu", "none").platform_class(), linux().platform_class());
        assert_ne!(mac().platform_class(), linux().platform_class());
    }

    fn dims() -> impl Strategy<Value = Dimensions> {
        proptest::collection::btree_map(
            "[a-c]",
            proptest::collection::btree_set("[x-z]", 1..3),
            0..4,
        )
        .prop_map(Dimensions)
    }

    fn reqs() -> impl Strategy<Value = Requirements> {
        proptest::collection::btree_map(
            "[a-c]",
            proptest::collection::btree_set("[x-z]", 1..3),
            0..4,
        )
        .prop_map(Requirements)
    }

    proptest! {
        #[test]
        fn matching_is_the_and_of_ors(req in reqs(), node in dims()) {
            let expected = req.0.iter().all(|(k, w)| node.0.get(k).is_some_and(|h| !h.is_disjoint(w)));
            prop_assert_eq!(req.matches(&node), expected);
            prop_assert_eq!(req.unmet(&node).next().is_none(), expected);
        }

        #[test]
        fn explain_agrees_with_matching(req in reqs(), nodes in proptest::collection::vec(dims(), 0..5)) {
            let n = nodes.iter().filter(|d| req.matches(d)).count();
            let e = explain(&req, &nodes);
            match e {
                Explanation::Matching(m) => prop_assert_eq!(m, n),
                Explanation::NoNodes => prop_assert!(nodes.is_empty()),
                Explanation::NoNodeHas { key, .. } => {
                    prop_assert_eq!(n, 0);
                    prop_assert!(nodes.iter().all(|d| req.unmet(d).any(|k| k == key)));
                }
                Explanation::NoNodeHasAll { closest_lacks, .. } => {
                    prop_assert_eq!(n, 0);
                    prop_assert!(!closest_lacks.is_empty());
                }
            }
        }
    }
}
