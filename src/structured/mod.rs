//! Structured output and tool calls: grammars compiled with llguidance, and the tool-call
//! text format. llguidance lives only here; the engine sees a [`TokenConstraint`].
//!
//! Knows JSON schemas, grammars, the tokenizer's byte pieces; never HTTP or the scheduler.
//! Invariant: fail closed. A grammar that does not compile, or compiles with a warning, is
//! an error naming the request field it came from, never an unconstrained run.

mod budget;
mod gbnf;
mod grammar;
pub mod reasoning;
mod schema;
pub mod toolcall;
mod toolprompt;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

pub use grammar::{ConstraintSpec, OutputFormat, ToolChoice, ToolSpec};
pub use toolcall::ToolFormat;

use crate::engine::constraint::{ConstraintError, TokenConstraint};
use crate::model::Tokenizer;

/// A request field whose grammar was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StructuredError {
    /// The request field, e.g. `response_format.json_schema` or `tools[0].function.parameters`.
    pub param: String,
    pub message: String,
}

impl StructuredError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Compiled grammars kept for reuse, by hash of the grammar.
const CACHE_ENTRIES: usize = 128;

/// The grammar compiler's stack (address space; pages are committed only as it recurses).
const COMPILE_STACK: usize = 512 << 20;

/// grammar hash -> (last use, the compiled matcher in its start state, or the error).
type Cache = HashMap<u64, (u64, Result<Matcher, String>)>;

/// The grammar compiler for one model's vocabulary, with a cache of compiled grammars.
pub struct Grammars {
    factory: ParserFactory,
    stop_ids: Vec<u32>,
    /// Token ids the model has (embedding rows): a forced token past them is never drafted.
    vocab: u32,
    /// (use counter, cache).
    cache: Mutex<(u64, Cache)>,
}

/// Our tokenizer seen through llguidance's tokenizer interface.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's tokens when they spell exactly `s`, else the trie's greedy ones.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        let encode = |text: &str| self.tokenizer.encode(text, false).ok();
        canonical(s, encode, |ids| self.trie.decode_raw(ids))
            .unwrap_or_else(|| self.trie.greedy_tokenize(s))
    }
}

/// How the tokenizer splits `s`, when its tokens spell exactly `s`. llguidance forces these
/// tokens, so they must: a tokenizer reads control-token text (`<|im_end|>` in a schema's
/// constant) as the control token, and a SentencePiece one puts a space before its input.
/// That space is avoided by tokenizing after a newline (which takes none) and dropping the
/// newline's tokens, when they end on a token boundary.
fn canonical(
    s: &[u8],
    encode: impl Fn(&str) -> Option<Vec<u32>>,
    spell: impl Fn(&[u32]) -> Vec<u8>,
) -> Option<Vec<u32>> {
    let text = std::str::from_utf8(s).ok()?;
    let ids = encode(text)?;
    if spell(&ids) == s {
        return Some(ids);
    }
    let ids = encode(&format!("\n{text}"))?;
    let mut lead = Vec::new();
    for (k, id) in ids.iter().enumerate() {
        if lead == b"\n" || lead == b" \n" {
            let rest = &ids[k..];
            return (spell(rest) == s).then(|| rest.to_vec());
        }
        lead.extend(spell(&[*id]));
        if lead.len() > 2 {
            return None;
        }
    }
    None
}

impl Grammars {
    /// `vocab_size`: the model's logits length (at least the tokenizer's vocabulary).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, String> {
        let mut words = tokenizer.token_bytes();
        words.resize(vocab_size.max(words.len()), Vec::new());
        let stop_ids = tokenizer.stop_ids.clone();
        let eos = stop_ids
            .first()
            .copied()
            .or(tokenizer.eos)
            .ok_or("the tokenizer has no end-of-turn or EOS token to end a grammar")?;
        let mut info = TokRxInfo::new(words.len() as u32, eos);
        info.tok_bos = tokenizer.bos;
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&stop_ids);
        let mut grammars = Self::from_env(Arc::new(Env { trie, tokenizer }), stop_ids)?;
        grammars.vocab = vocab_size as u32;
        Ok(grammars)
    }

    /// A compiler over any llguidance tokenizer; `stop_ids` end every grammar.
    pub(crate) fn from_env(env: TokEnv, stop_ids: Vec<u32>) -> Result<Self, String> {
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| format!("cannot set up the grammar engine: {e}"))?;
        factory.quiet();
        let vocab = env.tok_trie().vocab_size() as u32;
        Ok(Self {
            factory,
            stop_ids,
            vocab,
            cache: Mutex::new((0, HashMap::new())),
        })
    }

    /// Whether `id` is one of the model's stop tokens, which end every grammar.
    pub fn is_stop_id(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Builds and compiles the constraint a request asks for; `None` when it asks for none.
    /// Runs off the async threads (compiling can take milliseconds).
    pub fn constraint(
        &self,
        spec: &ConstraintSpec,
    ) -> Result<Option<Box<dyn TokenConstraint>>, StructuredError> {
        self.constraint_of(spec).map_err(|mut e| {
            let format_error = e.param.starts_with("response_format") || e.param == "grammar";
            if let Some(field) = spec.format_field.filter(|_| format_error) {
                e.param = field.to_string();
            }
            e
        })
    }

    fn constraint_of(
        &self,
        spec: &ConstraintSpec,
    ) -> Result<Option<Box<dyn TokenConstraint>>, StructuredError> {
        let gbnf = |src: &str| {
            let trie = self.factory.tok_env().tok_trie();
            let token = |t: &str| {
                trie.get_special_token(t)
                    .or_else(|| trie.token_id(t.as_bytes()))
            };
            gbnf::to_lark(src, &token, trie.vocab_size() as u32)
        };
        spec.check(&gbnf, |param, g| {
            self.compile(g)
                .map(|_| ())
                .map_err(|m| StructuredError::new(param, m))
        })?;
        let Some((param, grammar)) = spec.grammar(&gbnf)? else {
            return Ok(None);
        };
        let matcher = self
            .compile(grammar)
            .map_err(|m| StructuredError::new(param, m))?;
        let constraint = Box::new(Constraint {
            matcher,
            stop_ids: self.stop_ids.clone(),
            vocab: self.vocab,
        });
        // A reasoning budget the grammar's reasoning part cannot count (regex and Lark
        // formats have none).
        let starts_at_once = spec.format.starts_at_once();
        Ok(Some(match spec.think {
            Some(think) if !starts_at_once && think.budget.is_some_and(|b| b > 0) => {
                let budget = think.budget.unwrap_or_default() as usize;
                let env = self.factory.tok_env().clone();
                // Free text may end while it thinks, as it may with no budget.
                let free = spec.format == OutputFormat::Text && spec.tools.is_empty();
                let stops = if free {
                    self.stop_ids.clone()
                } else {
                    Vec::new()
                };
                Box::new(budget::Budgeted::new(
                    constraint, env, &think, budget, stops, self.vocab,
                ))
            }
            _ => constraint,
        }))
    }

    /// A fresh matcher for `grammar`, from the cache when it was compiled before.
    fn compile(&self, grammar: TopLevelGrammar) -> Result<Matcher, String> {
        let text = serde_json::to_string(&grammar).map_err(|e| e.to_string())?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let key = h.finish();
        {
            let mut guard = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let (tick, map) = &mut *guard;
            *tick += 1;
            if let Some((used, entry)) = map.get_mut(&key) {
                *used = *tick;
                return entry
                    .as_ref()
                    .map(Matcher::deep_clone)
                    .map_err(Clone::clone);
            }
        }
        let entry = self.compile_uncached(grammar);
        let out = entry
            .as_ref()
            .map(Matcher::deep_clone)
            .map_err(Clone::clone);
        let mut guard = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (tick, map) = &mut *guard;
        if map.len() >= CACHE_ENTRIES {
            if let Some(oldest) = map.iter().min_by_key(|(_, (u, _))| *u).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(key, (*tick, entry));
        out
    }

    /// Compiles on a thread of its own with a deep stack: llguidance's compiler recurses
    /// along chains of rules and `$ref`s, which a request writes (a few hundred overflow a
    /// 2 MiB stack, and an overflow aborts the process).
    fn compile_uncached(&self, grammar: TopLevelGrammar) -> Result<Matcher, String> {
        // The thread takes the grammar out; when it cannot start, it is still here.
        let slot = Mutex::new(Some(grammar));
        let take = || slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        std::thread::scope(|s| {
            let compile = || take().map_or(Err("no grammar".into()), |g| self.compile_here(g));
            match std::thread::Builder::new()
                .name("grammar-compile".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(s, compile)
            {
                Ok(thread) => thread
                    .join()
                    .map_err(|_| "the grammar compiler failed".to_string())?,
                // No thread (no memory for its stack): here, as before there was one.
                Err(e) => {
                    tracing::warn!(
                        "cannot start a grammar compiler thread ({e}); compiling in place"
                    );
                    compile()
                }
            }
        })
    }

    fn compile_here(&self, grammar: TopLevelGrammar) -> Result<Matcher, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let warnings = matcher.grammar_warnings();
        if !warnings.is_empty() {
            return Err(format!(
                "the grammar would not be enforced exactly: {}",
                warnings.join("; ")
            ));
        }
        Ok(matcher)
    }
}

/// For the fuzzer: `text` read as GBNF and, when the converter takes it, compiled by
/// llguidance over a byte vocabulary. `Err`: the compiler could not read the Lark the
/// converter wrote (its syntax errors read `line(column): ...`), a bug of ours.
#[doc(hidden)]
pub fn fuzz_gbnf(text: &str) -> Result<(), String> {
    static GRAMMARS: std::sync::OnceLock<Grammars> = std::sync::OnceLock::new();
    let g = GRAMMARS.get_or_init(|| {
        let env = llguidance::toktrie::ApproximateTokEnv::single_byte_env();
        Grammars::from_env(env, vec![261]).expect("a byte vocabulary's compiler")
    });
    let Ok(lark) = gbnf::to_lark(text, &|_| None, 262) else {
        return Ok(());
    };
    match g.compile_uncached(TopLevelGrammar::from_lark(lark.clone())) {
        Err(e) if e.split_once("): ").is_some_and(|(at, _)| at.contains('(')) => {
            Err(format!("{e}\n--- written as ---\n{lark}"))
        }
        _ => Ok(()),
    }
}

/// A Lark string literal: a JSON string, DEL escaped too (llguidance's lexer refuses it raw).
pub(crate) fn lark_string(s: &str) -> String {
    serde_json::to_string(s)
        .expect("a string serializes. This is a bug.")
        .replace('\u{7f}', "\\u007f")
}

/// A compiled grammar driving one sequence.
struct Constraint {
    matcher: Matcher,
    stop_ids: Vec<u32>,
    vocab: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ConstraintError {
    ConstraintError(format!("the output grammar failed to {what}: {e}"))
}

impl TokenConstraint for Constraint {
    fn allows(&mut self, token: u32) -> Result<bool, ConstraintError> {
        if self.stop_ids.contains(&token) {
            return self
                .matcher
                .is_accepting()
                .map_err(|e| failed("check a token", e));
        }
        if self.matcher.is_stopped() {
            return Ok(false);
        }
        let n = self
            .matcher
            .validate_tokens(&[token])
            .map_err(|e| failed("check a token", e))?;
        Ok(n == 1)
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| failed("compute a mask", e))?;
        // A stop token ends the reply only where the grammar may end, even where the grammar
        // would take it as a token (GBNF's `!<[id]>` is any other token, the stop included).
        let accepting = self
            .matcher
            .is_accepting()
            .map_err(|e| failed("compute a mask", e))?;
        let mut allowed = 0usize;
        for (i, l) in logits.iter_mut().enumerate() {
            if mask.is_allowed(i as u32) {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !accepting {
            for &s in &self.stop_ids {
                if let Some(l) = logits.get_mut(s as usize) {
                    allowed -= usize::from(mask.is_allowed(s));
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if allowed == 0 {
            return Err(ConstraintError(
                "the output grammar allows no token here".into(),
            ));
        }
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if self.stop_ids.contains(&token) {
            // A stop token ends the sequence; the grammar was accepting (checked above).
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| failed("accept a token", e))
    }

    fn forced(&mut self) -> Vec<u32> {
        if self.matcher.is_stopped() {
            return Vec::new();
        }
        // Up to a token the model cannot run (a larger replacement tokenizer) or a stop.
        let mut forced = self.matcher.compute_ff_tokens();
        let end = forced
            .iter()
            .position(|&t| t >= self.vocab || self.stop_ids.contains(&t))
            .unwrap_or(forced.len());
        forced.truncate(end);
        forced
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
mod reasoning_tests;
#[cfg(test)]
#[path = "toolcall_tests.rs"]
mod toolcall_tests;
