//! The `tojson` filter as Hugging Face's chat templates see it: Python's
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
//! minijinja's own `tojson` writes compact JSON with HTML-safe escapes, so a template that
//! shows tools or past calls with `tojson` (Llama 3.1, Qwen, Mistral) would give the model
//! text it was never tuned on.
//!
//! Invariant: for strings, integers, booleans, null, lists and maps the output is
//! byte-identical to Python's; keys keep their order unless `sort_keys`.

use std::io::{self, Write};

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};
use serde::Serialize;
use serde_json::ser::Formatter;

/// Python's separators and indentation.
struct PyFormatter {
    item_sep: String,
    key_sep: String,
    /// `None`: one line; `Some(unit)`: a newline and `unit` per level before each item.
    indent: Option<String>,
    level: usize,
    has_value: bool,
}

impl PyFormatter {
    fn item<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        if let Some(unit) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(unit.as_bytes())?;
            }
        }
        Ok(())
    }

    fn close<W: ?Sized + Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            if let Some(unit) = &self.indent {
                w.write_all(b"\n")?;
                for _ in 0..self.level {
                    w.write_all(unit.as_bytes())?;
                }
            }
        }
        w.write_all(bracket)
    }
}

impl Formatter for PyFormatter {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<(String, serde_json::Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        v => v,
    }
}

/// Non-ASCII characters as `\uXXXX` (surrogate pairs beyond the BMP), as `ensure_ascii`.
fn ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

fn bad(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// Python's `json.dumps` of `value` with these options.
pub fn dumps(
    value: &impl Serialize,
    indent: Option<String>,
    separators: Option<(String, String)>,
    sort_keys: bool,
    ensure_ascii: bool,
) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(value)?;
    if sort_keys {
        v = sorted(v);
    }
    let (item_sep, key_sep) = separators.unwrap_or_else(|| {
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let fmt = PyFormatter {
        item_sep,
        key_sep,
        indent,
        level: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser)?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8. This is a bug.");
    Ok(if ensure_ascii { ascii(&text) } else { text })
}

/// The `tojson` filter: `value | tojson(indent=4, sort_keys=true, ...)`.
pub fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            // A negative indent is Python's `" " * n`: newlines, no indentation.
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(bad("tojson: `indent` must be an integer or a string")),
        },
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(s) if s.len() == 2 => Some((s[0].clone(), s[1].clone())),
        Some(_) => return Err(bad("tojson: `separators` must be two strings")),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let text = dumps(value, indent, separators, sort_keys, ensure_ascii)
        .map_err(|e| bad(format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(text))
}

#[cfg(test)]
mod tests {
    use super::dumps;
    use serde_json::json;

    fn py(v: &serde_json::Value) -> String {
        dumps(v, None, None, false, false).unwrap()
    }

    #[test]
    fn python_json_dumps_is_reproduced() {
        // The outputs are Python 3's `json.dumps(v, ensure_ascii=False, ...)`.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"a": [1, 2.5, true, null], "b": {}}, "c": []}, "s": "é <&> \"q\"\n"}"#,
        )
        .unwrap();
        assert_eq!(
            py(&v),
            r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"a": [1, 2.5, true, null], "b": {}}, "c": []}, "s": "é <&> \"q\"\n"}"#
        );
        assert_eq!(
            dumps(
                &json!({"b": [1, {"x": []}], "a": {}}),
                Some("  ".into()),
                None,
                false,
                false
            )
            .unwrap(),
            "{\n  \"b\": [\n    1,\n    {\n      \"x\": []\n    }\n  ],\n  \"a\": {}\n}"
        );
        assert_eq!(
            dumps(
                &json!({"b": 1, "a": {"d": 2, "c": 3}}),
                None,
                None,
                true,
                false
            )
            .unwrap(),
            r#"{"a": {"c": 3, "d": 2}, "b": 1}"#
        );
        assert_eq!(
            dumps(
                &json!({"a": [1, 2]}),
                None,
                Some((",".into(), ":".into())),
                false,
                false
            )
            .unwrap(),
            r#"{"a":[1,2]}"#
        );
        assert_eq!(
            dumps(&json!(["é", "😀", "\u{7f}"]), None, None, false, true).unwrap(),
            r#"["\u00e9", "\ud83d\ude00", "\u007f"]"#
        );
        assert_eq!(
            dumps(&json!([]), Some("    ".into()), None, false, false).unwrap(),
            "[]"
        );
    }
}
