//! The checks on a user's schema before it is compiled: no llguidance options, and OpenAI's
//! strict-mode rules when asked; and a tool's name.

use serde_json::{json, Value};

use super::super::StructuredError;

/// Refuses llguidance's `x-guidance` options anywhere in a user schema: they include a
/// lenient mode that drops what it cannot enforce.
fn reject_x_guidance(v: &Value, param: &str) -> Result<(), StructuredError> {
    match v {
        Value::Object(m) => {
            if m.contains_key("x-guidance") {
                return Err(StructuredError::new(
                    param,
                    "`x-guidance` is not accepted in schemas: options that loosen enforcement are not offered",
                ));
            }
            m.values().try_for_each(|v| reject_x_guidance(v, param))
        }
        Value::Array(a) => a.iter().try_for_each(|v| reject_x_guidance(v, param)),
        _ => Ok(()),
    }
}

/// OpenAI's strict-mode rules: every object lists all its properties in `required` and sets
/// `additionalProperties: false`.
fn check_strict(v: &Value, param: &str, at: &str) -> Result<(), StructuredError> {
    let Some(m) = v.as_object() else {
        return Ok(());
    };
    let is_object = m.get("type").is_some_and(|t| {
        t == "object"
            || t.as_array()
                .is_some_and(|a| a.iter().any(|t| t == "object"))
    }) || m.contains_key("properties");
    if is_object {
        if m.get("additionalProperties") != Some(&Value::Bool(false)) {
            return Err(StructuredError::new(
                param,
                format!("strict mode: `additionalProperties` must be false at `{at}`"),
            ));
        }
        let required: Vec<&str> = m
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = m.get("properties").and_then(Value::as_object) {
            if let Some(missing) = props.keys().find(|k| !required.contains(&k.as_str())) {
                return Err(StructuredError::new(
                    param,
                    format!(
                        "strict mode: property `{missing}` at `{at}` must be listed in `required`"
                    ),
                ));
            }
        }
    }
    for (k, child) in m {
        match (k.as_str(), child) {
            ("properties" | "$defs" | "definitions" | "patternProperties", Value::Object(c)) => {
                for (name, s) in c {
                    check_strict(s, param, &format!("{at}/{k}/{name}"))?;
                }
            }
            ("anyOf" | "allOf" | "oneOf" | "prefixItems", Value::Array(a)) => {
                for (i, s) in a.iter().enumerate() {
                    check_strict(s, param, &format!("{at}/{k}/{i}"))?;
                }
            }
            ("items" | "additionalProperties" | "additionalItems", Value::Object(_)) => {
                check_strict(child, param, &format!("{at}/{k}"))?;
            }
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn check_object_schema(
    schema: &Value,
    param: &str,
    strict: bool,
) -> Result<(), StructuredError> {
    if !schema.is_object() {
        return Err(StructuredError::new(
            param,
            "the schema must be a JSON object",
        ));
    }
    reject_x_guidance(schema, param)?;
    if strict {
        if schema.get("type") != Some(&json!("object")) {
            return Err(StructuredError::new(
                param,
                "strict mode: the root schema must have `type: \"object\"`",
            ));
        }
        check_strict(schema, param, "#")?;
    }
    Ok(())
}

pub(super) fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
