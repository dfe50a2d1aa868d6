//! The head of a call in the named format (`[TOOL_CALLS]name[ARGS]`), and new call ids.

use super::{ToolFormat, CALL_ID};

/// What the text after a named call's `[TOOL_CALLS]` holds so far.
pub(super) enum NamedHead {
    More,
    NotACall,
    /// `name[ARGS]` or `name[CALL_ID]id[ARGS]`, `len` bytes of it.
    Call {
        name: String,
        id: Option<String>,
        len: usize,
    },
}

pub(super) fn named_head(f: &ToolFormat, rest: &str) -> NamedHead {
    let call_id = f.call_id_token_id.map(|_| CALL_ID);
    let Some(end) = rest.find(|c: char| !is_name_char(c)) else {
        // Function names are at most 64 characters.
        return match rest.len() > 64 {
            true => NamedHead::NotACall,
            false => NamedHead::More,
        };
    };
    let (name, tail) = rest.split_at(end);
    if end > 64 {
        return NamedHead::NotACall;
    }
    let call = |id: Option<&str>, after: &str| NamedHead::Call {
        name: name.to_string(),
        id: id.map(str::to_string),
        len: rest.len() - after.len(),
    };
    if let Some(after) = tail.strip_prefix(f.args_token) {
        return match name.is_empty() {
            true => NamedHead::NotACall,
            false => call(None, after),
        };
    }
    if let Some(t) = call_id.and_then(|c| tail.strip_prefix(c)) {
        let Some(id_end) = t.find(|c: char| !c.is_ascii_alphanumeric()) else {
            return NamedHead::More;
        };
        let (id, t) = t.split_at(id_end);
        return match t.strip_prefix(f.args_token) {
            Some(after) if !name.is_empty() => call(Some(id), after),
            None if f.args_token.starts_with(t) => NamedHead::More,
            _ => NamedHead::NotACall,
        };
    }
    let marker_start =
        f.args_token.starts_with(tail) || call_id.is_some_and(|c| c.starts_with(tail));
    match marker_start {
        true => NamedHead::More,
        false => NamedHead::NotACall,
    }
}

/// What a function's name is made of, in the named format (OpenAI's own rule, and `.`).
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

pub(super) fn new_call_id(short: bool) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    if short {
        return (0..9)
            .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
            .collect();
    }
    let n: u64 = rng.gen();
    format!("call_{n:016x}")
}
