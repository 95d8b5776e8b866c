//! DAG-CBOR, the encoding of the documents grid names with the `dag-cbor` codec (0x71):
//! manifests (from version 2) and job specs (from version 2).
//!
//! The encoding is the IPLD DAG-CBOR specification's strict form, so that any DAG-CBOR
//! implementation decodes grid's documents and computes the same ids from them:
//! - map keys are text strings, sorted by the length of their encoding and then bytewise (a
//!   struct's fields are no longer written in declaration order);
//! - integers take their shortest form; lengths are definite; there are no floats;
//! - a content id is a link: tag 42 around a byte string of `0x00` (the identity multibase
//!   prefix) and the CID's bytes.
//!
//! It is built on `serde_cbor`'s value tree, whose map order is the canonical one above: a
//! document is serialized into a [`Value`], every byte string in it becomes a link, and the
//! tree is written out. That last step relies on one fact about the documents encoded here:
//! **they hold no byte strings but content ids** (a [`ContentId`](crate::content::ContentId)
//! serializes as its bytes). A type with other byte strings must not be encoded with
//! [`to_vec`].
//!
//! [`from_slice`] turns links back into byte strings and refuses any other tag and any float;
//! it does not check canonical form by itself. Callers do, as everywhere in grid: a document
//! is accepted only when its re-encoding is exactly the bytes received, so one meaning has one
//! encoding and one id.
//!
//! Frames (`crate::message`) and stored records keep their own CBOR (declaration-ordered
//! structs, content ids as plain byte strings): nothing names them by a dag-cbor id.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_cbor::Value;

/// The CBOR tag of an IPLD link.
pub const TAG_LINK: u64 = 42;

fn links_in(v: Value) -> Value {
    match v {
        Value::Bytes(b) => {
            let mut link = Vec::with_capacity(b.len() + 1);
            link.push(0);
            link.extend_from_slice(&b);
            Value::Tag(TAG_LINK, Box::new(Value::Bytes(link)))
        }
        Value::Array(a) => Value::Array(a.into_iter().map(links_in).collect()),
        Value::Map(m) => Value::Map(m.into_iter().map(|(k, v)| (k, links_in(v))).collect()),
        Value::Tag(t, inner) => Value::Tag(t, Box::new(links_in(*inner))),
        other => other,
    }
}

fn links_out(v: Value) -> Result<Value, String> {
    Ok(match v {
        Value::Tag(TAG_LINK, inner) => match *inner {
            Value::Bytes(b) if b.first() == Some(&0) => Value::Bytes(b[1..].to_vec()),
            _ => return Err("a link (tag 42) that is not 0x00 and a CID's bytes".into()),
        },
        Value::Tag(t, _) => return Err(format!("CBOR tag {t}; DAG-CBOR allows only 42 (links)")),
        Value::Float(_) => return Err("a float; grid's documents hold none".into()),
        Value::Array(a) => Value::Array(a.into_iter().map(links_out).collect::<Result<_, _>>()?),
        Value::Map(m) => Value::Map(
            m.into_iter()
                .map(|(k, v)| Ok((links_out(k)?, links_out(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other,
    })
}

/// The DAG-CBOR encoding of `v`, whose only byte strings are content ids (see the module docs).
pub fn to_vec<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_cbor::Error> {
    let tree = serde_cbor::value::to_value(v)?;
    serde_cbor::to_vec(&links_in(tree))
}

/// Parses CBOR into a value tree, links turned back into the byte strings of their CIDs.
/// Refuses tags other than 42 and floats; does not check canonical form (see the module docs).
pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let tree: Value = serde_cbor::from_slice(bytes).map_err(|e| e.to_string())?;
    links_out(tree)
}

/// The value of the text key `key` of a top-level map, when it is an unsigned integer: how a
/// reader tells a document's format version before choosing how to read the rest.
pub fn uint_field(tree: &Value, key: &str) -> Option<u64> {
    let Value::Map(m) = tree else { return None };
    match m.get(&Value::Text(key.to_string())) {
        Some(Value::Integer(i)) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// Reads `T` out of a tree from [`parse`].
pub fn from_value<T: DeserializeOwned>(tree: Value) -> Result<T, String> {
    serde_cbor::value::from_value(tree).map_err(|e| e.to_string())
}

/// [`parse`] and then [`from_value`].
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    from_value(parse(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Doc {
        zz: u64,
        a: crate::content::ContentId,
        #[serde(rename = "bb")]
        b: BTreeMap<String, u32>,
    }

    #[test]
    fn keys_sort_length_first_and_ids_are_links() {
        let id = crate::content::block_id(b"x");
        let doc = Doc { zz: 1, a: id, b: [("bbb".into(), 1), ("c".into(), 300)].into() };
        let bytes = to_vec(&doc).unwrap();
        let mut want = hex::decode("a3").unwrap();
        want.extend(hex::decode("6161d82a5819").unwrap()); // "a": tag 42, 25 bytes
        want.push(0); // the identity multibase prefix
        want.extend(id.to_bytes());
        // "bb": {"c": 300, "bbb": 1} (shorter key first, though "bbb" < "c" bytewise).
        want.extend(hex::decode("626262a2616319012c6362626201").unwrap());
        want.extend(hex::decode("627a7a01").unwrap()); // "zz": 1
        assert_eq!(hex::encode(&bytes), hex::encode(&want));
        assert_eq!(from_slice::<Doc>(&bytes).unwrap(), doc);
        let tree = parse(&bytes).unwrap();
        assert_eq!(uint_field(&tree, "zz"), Some(1));
        assert_eq!(uint_field(&tree, "a"), None);
    }

    #[test]
    fn other_tags_floats_and_bad_links_are_refused() {
        // {"a": tag 43 (...)}
        let err = from_slice::<Value>(&hex::decode("a16161d82b4100").unwrap()).unwrap_err();
        assert!(err.contains("tag 43"), "{err}");
        // {"a": 1.5}
        let err = from_slice::<Value>(&hex::decode("a16161f93e00").unwrap()).unwrap_err();
        assert!(err.contains("float"), "{err}");
        // A link without its 0x00 prefix.
        let err = from_slice::<Value>(&hex::decode("a16161d82a4101").unwrap()).unwrap_err();
        assert!(err.contains("link"), "{err}");
    }
}
