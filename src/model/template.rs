//! Chat templates: the model's `tokenizer.chat_template` rendered with minijinja, or a
//! built-in ChatML, Llama 3 or Mistral template when the file has none.
//!
//! Knows message lists and Jinja; never token ids. Invariant: rendering is byte-identical to
//! Python jinja2 as Hugging Face runs it (trim_blocks, lstrip_blocks, Python string methods,
//! `tojson` as `json.dumps`, maps in their insertion order).

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// One chat message, as Hugging Face chat templates see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, OpenAI-shaped, `function.arguments` as a JSON object (as
    /// templates expect it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

pub const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}";

/// A compiled chat template with the special-token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Templates use this for "today's date" lines; without a time zone database we use UTC.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    format
        .replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", MONTHS[(m - 1) as usize])
        .replace("%b", &MONTHS[(m - 1) as usize][..3])
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The most instructions one render of a chat template may run.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// Hugging Face's `{% generation %}` ... `{% endgeneration %}` (it marks the assistant's
/// tokens for training masks and renders what it holds) as a block minijinja knows that
/// does the same: `{% if true %}` ... `{% endif %}`, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    // Each `{{ }}`, `{% %}` and `{# #}` in turn, so text inside one is never read as a tag.
    while let Some(open) = rest.find('{').filter(|&o| o + 1 < rest.len()) {
        let end = match rest.as_bytes()[open + 1] {
            b'{' => "}}",
            b'%' => "%}",
            b'#' => "#}",
            _ => {
                out.push_str(&rest[..open + 1]);
                rest = &rest[open + 1..];
                continue;
            }
        };
        let Some(close) = rest[open + 2..].find(end).map(|c| open + 2 + c + 2) else {
            break;
        };
        let tag = &rest[open..close];
        out.push_str(&rest[..open]);
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+');
        let word = match (end, inner.trim()) {
            ("%}", "generation") => Some("if true"),
            ("%}", "endgeneration") => Some("endif"),
            _ => None,
        };
        match word {
            Some(w) => out.push_str(&tag.replacen(inner.trim(), w, 1)),
            None => out.push_str(tag),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template's loops end: a render past this many instructions is an error, not a
        // request that holds a thread for ever (a real chat's render takes thousands).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // Python's `json.dumps`, as Hugging Face's templates were written against.
        env.add_filter("tojson", super::pyjson::tojson);
        env.add_template_owned("chat", without_generation_tags(source))
            .map_err(|e| ModelError::Template(format!("cannot parse the chat template: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Another template source with the same special tokens.
    pub fn with_source(&self, source: &str) -> Result<Self, ModelError> {
        Self::new(source, &self.bos_token, &self.eos_token)
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Picks a built-in template from the vocabulary's special tokens.
    pub fn fallback_source(has_token: impl Fn(&str) -> bool) -> &'static str {
        if has_token("<|im_start|>") {
            CHATML
        } else if has_token("<|start_header_id|>") {
            LLAMA3
        } else {
            MISTRAL
        }
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// [`render`](Self::render), with `tools` (OpenAI-shaped function list) given to the
    /// template as `tools`.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, ModelError> {
        self.render_with(
            messages,
            add_generation_prompt,
            tools,
            &serde_json::Map::new(),
        )
    }

    /// The variables a template reads that a request may not set (`chat_template_kwargs`).
    pub const RESERVED: [&'static str; 7] = [
        "messages",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "tools",
        "raise_exception",
        "strftime_now",
    ];

    /// As [`Self::render_with_tools`], with more variables for the template (a request's
    /// `chat_template_kwargs`, e.g. `enable_thinking`); none of them [`Self::RESERVED`].
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&[serde_json::Value]>,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ModelError> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("the chat template was added in new(). This is a bug.");
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            ..Value::from_serialize(extra)
        })
        .map_err(|e| ModelError::Template(format!("cannot render the chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ]
    }

    #[test]
    fn hugging_faces_generation_tags_render_what_they_hold() {
        // TRL's assistant-mask templates (SmolLM3's too) wrap the assistant's turn in them.
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% else %}({{ m.content }}){% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&msgs(), false).unwrap(),
            "(Be brief.)(Hi)[Hello!](Bye)"
        );
        // The source is kept as written; other tags and text that merely spells one are kept.
        assert_eq!(t.source(), src);
        let t = ChatTemplate::new("{{ '{% generation %}' }}{é}{", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "{% generation %}{é}{");
    }

    #[test]
    fn chatml_renders_roles_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t.render(&msgs(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs()[..2], false).unwrap();
        assert!(out.ends_with("Hi<|im_end|>\n"));
    }

    #[test]
    fn llama3_and_mistral_use_bos_and_eos() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t.render(&msgs()[1..2], true).unwrap();
        assert_eq!(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
        let t = ChatTemplate::new(MISTRAL, "<s>", "</s>").unwrap();
        let out = t.render(&msgs()[1..4], true).unwrap();
        assert_eq!(out, "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye [/INST]");
    }

    #[test]
    fn a_template_that_loops_for_ever_is_an_error() {
        let src = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&msgs()[1..2], true).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false).unwrap(),
            "HI"
        );
        let err = t.render(&[Message::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tools_render_as_python_shows_them() {
        // Key order as the client sent it, Python's separators, no HTML escapes; as
        // jinja2 renders `{{ tools | tojson }}`, `tojson(indent=2)` and `.items()`.
        let tools: Vec<serde_json::Value> = vec![serde_json::from_str(
            r#"{"type": "function", "function": {"name": "f", "description": "a <b> & 'c'", "parameters": {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "integer"}}}}}"#,
        )
        .unwrap()];
        let src = "{{ tools | tojson }}|{{ tools[0].function.parameters.properties | tojson(indent=2) }}|{% for k, v in tools[0].function.items() %}{{ k }},{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t.render_with_tools(&[], false, Some(&tools)).unwrap();
        assert_eq!(
            out,
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"a <b> & 'c'\", \"parameters\": {\"type\": \"object\", \"properties\": {\"z\": {\"type\": \"string\"}, \"a\": {\"type\": \"integer\"}}}}}]|{\n  \"z\": {\n    \"type\": \"string\"\n  },\n  \"a\": {\n    \"type\": \"integer\"\n  }\n}|name,description,parameters,"
        );
    }

    #[test]
    fn bad_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for %}", "", "").err().unwrap();
        assert!(err.to_string().contains("cannot parse the chat template"));
    }

    #[test]
    fn fallback_is_chosen_from_special_tokens() {
        assert_eq!(
            ChatTemplate::fallback_source(|t| t == "<|im_start|>"),
            CHATML
        );
        assert_eq!(
            ChatTemplate::fallback_source(|t| t == "<|start_header_id|>"),
            LLAMA3
        );
        assert_eq!(ChatTemplate::fallback_source(|_| false), MISTRAL);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_783), (2026, 11, 26));
    }
}
