//! Rewrites of a user's JSON Schema before llguidance compiles it.
//!
//! llguidance refuses `oneOf` (it cannot check that exactly one branch matches). When no
//! value can match two branches, `oneOf` and `anyOf` accept the same values, so such a
//! `oneOf` becomes an `anyOf`. That covers discriminated unions as Pydantic and Zod write
//! them (objects told apart by a required property's constant), branches of distinct types,
//! and branches of distinct constants. Any other `oneOf` is left for llguidance to refuse.
//!
//! A string `format` llguidance does not know (Pydantic's `password` and `binary`,
//! OpenAPI's `byte`) is dropped: JSON Schema reads `format` as an annotation unless told
//! otherwise, and OpenAI's non-strict tools take them; llguidance would refuse the schema.

use serde_json::Value;

/// Keywords whose value is one schema, an object of schemas, or an array of schemas: the
/// only places a traversal looks (a `const`, `enum` or `default` is data, not schema).
const ONE: &[&str] = &[
    "items",
    "additionalProperties",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
];
const MAP: &[&str] = &[
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];
const LIST: &[&str] = &["anyOf", "allOf", "oneOf", "prefixItems", "items"];

/// The string formats llguidance 1.9 enforces (its `json/formats.rs`); others are dropped.
const KNOWN_FORMATS: &[&str] = &[
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
    "uri",
    "unknown",
];

/// Keywords that change what a `$ref` points to (base URIs, anchors, dynamic scopes):
/// a schema holding any is left as it is, since `resolve` reads `#/...` from the root.
const SCOPING: &[&str] = &[
    "$id",
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
];

/// Rewrites every `oneOf` of disjoint branches in `schema` (at any depth) into `anyOf`, and
/// drops the string formats llguidance does not know.
pub(crate) fn rewritten_for_llguidance(schema: &mut Value) {
    if has_key(schema, SCOPING) {
        return;
    }
    let root = schema.clone();
    rewrite(&root, schema);
}

fn has_key(v: &Value, keys: &[&str]) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| keys.contains(&k.as_str()) || has_key(v, keys)),
        Value::Array(a) => a.iter().any(|v| has_key(v, keys)),
        _ => false,
    }
}

/// JSON Schema's equality: numbers by value (`1` is `1.0`), arrays and objects member by
/// member. (Integers past 2^53 may compare equal when they differ: that only keeps a
/// `oneOf` as it is.)
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn rewrite(root: &Value, node: &mut Value) {
    let Some(m) = node.as_object_mut() else {
        return;
    };
    for (k, v) in m.iter_mut() {
        let k = k.as_str();
        if ONE.contains(&k) && v.is_object() {
            rewrite(root, v);
        }
        if MAP.contains(&k) {
            if let Some(children) = v.as_object_mut() {
                children.values_mut().for_each(|c| rewrite(root, c));
            }
        }
        if LIST.contains(&k) {
            if let Some(children) = v.as_array_mut() {
                children.iter_mut().for_each(|c| rewrite(root, c));
            }
        }
    }
    if m.get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| !KNOWN_FORMATS.contains(&f))
    {
        m.remove("format");
    }
    let disjoint = match m.get("oneOf") {
        Some(Value::Array(branches)) => !m.contains_key("anyOf") && disjoint(root, branches),
        _ => false,
    };
    if disjoint {
        let branches = m.remove("oneOf").expect("checked above");
        m.insert("anyOf".into(), branches);
        // An OpenAPI annotation without meaning in JSON Schema.
        m.remove("discriminator");
    }
}

/// The schema a local `$ref` (`#/...`) points to, followed a few times; other schemas as
/// they are. A branch with a `$ref` and more keywords matches no more than its target.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> Option<&'a Value> {
    for _ in 0..8 {
        let Some(r) = v.get("$ref") else {
            return Some(v);
        };
        let pointer = r.as_str()?.strip_prefix('#')?;
        v = root.pointer(pointer)?;
    }
    None
}

/// Whether no value can match two of `branches`.
fn disjoint(root: &Value, branches: &[Value]) -> bool {
    let Some(bs) = branches
        .iter()
        .map(|b| resolve(root, b))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    if bs.len() < 2 {
        return true;
    }
    let pairwise = |sets: &[Vec<&Value>], overlap: fn(&Value, &Value) -> bool| {
        sets.iter().enumerate().all(|(i, a)| {
            sets[i + 1..]
                .iter()
                .all(|b| a.iter().all(|x| b.iter().all(|y| !overlap(x, y))))
        })
    };
    // Distinct constants.
    if let Some(values) = bs.iter().map(|b| constants(b)).collect::<Option<Vec<_>>>() {
        if pairwise(&values, same) {
            return true;
        }
    }
    // Distinct types (an integer is also a number).
    if let Some(types) = bs.iter().map(|b| types(b)).collect::<Option<Vec<_>>>() {
        let overlap = |a: &Value, b: &Value| {
            a == b || (a == "integer" && b == "number") || (a == "number" && b == "integer")
        };
        if pairwise(&types, overlap) {
            return true;
        }
    }
    // Objects told apart by one required property's distinct constants.
    let Some(first) = bs[0].get("properties").and_then(Value::as_object) else {
        return false;
    };
    first.keys().any(|p| {
        let values = bs
            .iter()
            .map(|b| tag(root, b, p))
            .collect::<Option<Vec<_>>>();
        values.is_some_and(|v| pairwise(&v, same))
    })
}

/// The values a schema allows when it lists them (`const`, `enum`).
fn constants(s: &Value) -> Option<Vec<&Value>> {
    match (s.get("const"), s.get("enum")) {
        (Some(c), _) => Some(vec![c]),
        (None, Some(Value::Array(e))) => Some(e.iter().collect()),
        _ => None,
    }
}

/// The JSON types a schema allows when it names them.
fn types(s: &Value) -> Option<Vec<&Value>> {
    match s.get("type")? {
        t @ Value::String(_) => Some(vec![t]),
        Value::Array(ts) => Some(ts.iter().collect()),
        _ => None,
    }
}

/// The constants property `p` may take in object schema `s`, when `s` admits only objects
/// that have `p`.
fn tag<'a>(root: &'a Value, s: &'a Value, p: &str) -> Option<Vec<&'a Value>> {
    if s.get("type")? != "object" {
        return None;
    }
    let required = s.get("required")?.as_array()?;
    if !required.iter().any(|r| r == p) {
        return None;
    }
    constants(resolve(root, s.get("properties")?.get(p)?)?)
}

#[cfg(test)]
mod tests {
    use super::rewritten_for_llguidance as rewrite;
    use serde_json::{json, Value};

    fn rewritten(mut v: Value) -> Value {
        rewrite(&mut v);
        v
    }

    #[test]
    fn discriminated_unions_become_any_of() {
        // Pydantic's shape: `$ref` branches, a `discriminator`, the tag required.
        let pet = json!({
            "$defs": {
                "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                        "required": ["kind", "lives"]},
                "Dog": {"type": "object", "properties": {"kind": {"enum": ["dog"]}, "good": {"type": "boolean"}},
                        "required": ["kind"]}},
            "type": "object",
            "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}],
                                   "discriminator": {"propertyName": "kind"}}},
            "required": ["pet"]});
        let out = rewritten(pet.clone());
        assert_eq!(
            out["properties"]["pet"],
            json!({"anyOf": pet["properties"]["pet"]["oneOf"]})
        );
        // Not required in one branch, or the same tag twice: may overlap, left alone.
        let mut loose = pet.clone();
        loose["$defs"]["Dog"]["required"] = json!(["good"]);
        assert_eq!(rewritten(loose.clone()), loose);
        let mut same = pet;
        same["$defs"]["Dog"]["properties"]["kind"] = json!({"const": "cat"});
        assert_eq!(rewritten(same.clone()), same);
    }

    #[test]
    fn distinct_types_and_constants_become_any_of_and_overlaps_stay() {
        let types = json!({"oneOf": [{"type": "string"}, {"type": ["integer", "null"]}]});
        assert!(rewritten(types)["anyOf"].is_array());
        let consts = json!({"oneOf": [{"const": 1}, {"enum": [2, 3]}]});
        assert!(rewritten(consts)["anyOf"].is_array());
        for overlap in [
            json!({"oneOf": [{"type": "integer"}, {"type": "number"}]}),
            json!({"oneOf": [{"enum": [1, 2]}, {"const": 2}]}),
            json!({"oneOf": [{"type": "string"}, {"minLength": 2}]}),
            // Without `type: object`, a branch also takes every non-object.
            json!({"oneOf": [{"properties": {"k": {"const": "a"}}, "required": ["k"]},
                             {"properties": {"k": {"const": "b"}}, "required": ["k"]}]}),
            json!({"oneOf": [{"$ref": "#/$defs/missing"}, {"type": "string"}]}),
            // Equal numbers written differently are one value.
            json!({"oneOf": [{"const": 1}, {"const": 1.0}]}),
            json!({"oneOf": [{"const": [1, {"a": 2.0}]}, {"enum": [[1.0, {"a": 2}]]}]}),
            // A `$ref` may not point where `#/...` from the root does.
            json!({"$id": "https://example.org/s", "oneOf": [{"const": 1}, {"const": 2}]}),
        ] {
            assert_eq!(rewritten(overlap.clone()), overlap);
        }
    }

    #[test]
    fn unknown_string_formats_are_dropped_where_they_are_schema() {
        let v = json!({"type": "object", "properties": {
            "pw": {"type": "string", "format": "password"},
            "day": {"type": "string", "format": "date"},
            "format": {"type": "string"}},
            "default": {"format": "password"}});
        let out = rewritten(v.clone());
        assert_eq!(out["properties"]["pw"], json!({"type": "string"}));
        assert_eq!(out["properties"]["day"], v["properties"]["day"]);
        assert_eq!(out["properties"]["format"], v["properties"]["format"]);
        assert_eq!(out["default"], v["default"]);
    }

    #[test]
    fn data_is_never_rewritten_and_nested_schemas_are() {
        let v = json!({"type": "object",
            "properties": {"a": {"const": {"oneOf": [{"type": "string"}, {"type": "null"}]}},
                           "b": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "null"}]}}},
            "default": {"oneOf": [1]}});
        let out = rewritten(v.clone());
        assert_eq!(out["properties"]["a"], v["properties"]["a"]);
        assert_eq!(out["default"], v["default"]);
        assert!(out["properties"]["b"]["items"]["anyOf"].is_array());
    }
}
