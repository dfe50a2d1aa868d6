//! What the API layer hands the engine (a validated [`GenerationRequest`]) and what comes back
//! on each request's own channel ([`Event`]).

use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use super::constraint::TokenConstraint;
use super::sampler::SamplingParams;
pub use crate::model::Pooling;

/// Why generation ended, with OpenAI's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// The token budget ran out.
    Length,
}

/// A validated request: token ids, budgets and sampling, nothing about HTTP.
#[derive(Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Where the stop strings stop applying (a tool call's marker), if anywhere.
    pub stops_end: Option<super::stop::StopsEnd>,
    /// Number of most likely alternatives to report per token (0: only the chosen token's
    /// logprob when `logprobs` is set).
    pub top_logprobs: usize,
    pub logprobs: bool,
    /// Score the prompt's own tokens, with this many alternatives each: an
    /// [`Event::Prompt`] comes before the first token. Such a request does not read the
    /// prefix cache (a cached position has no logits).
    pub prompt_logprobs: Option<usize>,
    /// For the logs: the caller's request id.
    pub request_id: String,
    pub received: Instant,
    /// Whether this request may read and feed the prefix cache.
    pub cache_prompt: bool,
    /// What the output must match (a grammar), ready to run; `None`: free text.
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Told once how the request ended and what it computed, however it ended.
    pub on_end: Option<UsageSink>,
    /// Whose request it is: waiting requests are admitted fairly among tenants.
    pub tenant: Tenant,
    /// Tokens the client expects the output to hold (OpenAI's Predicted Outputs): with
    /// speculation on, drafts come from them first. Empty: none.
    pub prediction: Vec<u32>,
    /// Embed the prompt instead of continuing it: its final hidden states pooled this way
    /// come back as one [`Event::Embedding`] (`max_tokens` is then ignored, nothing is
    /// sampled). Such a request neither reads nor feeds the prefix cache.
    pub embed: Option<Pooling>,
    /// Control tokens whose text the output keeps (a tool-call format's markers, for the
    /// caller's parser); every other control token decodes to nothing.
    pub shown_tokens: Vec<u32>,
    /// llama-server's limits on a code completion's lines (none by default): reached, the
    /// reply ends with [`FinishReason::Length`].
    pub lines: super::lines::LineLimits,
    /// The LoRA adapter it runs with (the model's index), or the base model alone. Its
    /// prefix-cache blocks are its adapter's own.
    pub adapter: Option<usize>,
}

/// Whose request it is, for fair admission: any number naming a key or end user (0 for
/// none), and its weight: under contention, tenants' shares of the running batch follow
/// their weights (at least 1). A background request (a batch's, or one sent at low
/// priority) is admitted only when no other waits, and is the first preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant {
    pub id: u64,
    pub weight: u32,
    pub background: bool,
}

impl From<u64> for Tenant {
    /// Tenant `id` of weight 1, in the foreground.
    fn from(id: u64) -> Self {
        Self {
            id,
            weight: 1,
            background: false,
        }
    }
}

/// How a request ended, for metering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Finished(FinishReason),
    /// The client left (in any phase) or the engine stopped first.
    Cancelled,
    Failed,
}

/// What the engine reports when a request ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndReport {
    pub ending: Ending,
    /// The tokens actually computed: a request cancelled mid-prefill reports only the prompt
    /// tokens it got through.
    pub usage: Usage,
    pub first_token_at: Option<Instant>,
}

/// Called exactly once when a request ends, however it ends.
pub struct UsageSink(Box<dyn FnOnce(EndReport) + Send>);

impl UsageSink {
    pub fn new(f: impl FnOnce(EndReport) + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    pub fn call(self, report: EndReport) {
        (self.0)(report)
    }
}

impl std::fmt::Debug for UsageSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageSink")
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenLogprob {
    /// The token's id (llama.cpp's shapes show it; OpenAI's do not).
    #[serde(skip)]
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogprobInfo {
    #[serde(flatten)]
    pub chosen: TokenLogprob,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Tokens of the client's prediction offered as drafts and kept, and offered and not
    /// kept (OpenAI's Predicted Outputs; both 0 without a prediction).
    pub accepted_prediction_tokens: usize,
    pub rejected_prediction_tokens: usize,
    /// Completion tokens spent in a reasoning model's thinking: counted by the API's reply
    /// parser, which knows the markers (the engine leaves 0).
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's tokens scored (asked with `prompt_logprobs`): the first token's text,
    /// then each later token's logprob given the ones before it.
    Prompt {
        first: String,
        logprobs: Vec<LogprobInfo>,
    },
    /// New text (may be empty when a token completes no character, or is held back by a
    /// possible stop string) for one generated token.
    Token {
        text: String,
        logprob: Option<LogprobInfo>,
        /// When the engine made it (a renderer may read events in bursts).
        at: std::time::Instant,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// The request's stop string that ended it, if one did.
        stop_sequence: Option<String>,
        /// With `logprobs`, the logprob of the stop token that ended the reply when it is in
        /// no token's entry (not scoring): never shown, `best_of` ranks with it.
        end_logprob: Option<f32>,
    },
    /// An embedding request's vector: its prompt's final hidden states pooled, of unit
    /// length. Comes before its [`Event::Finished`].
    Embedding(Vec<f32>),
    Failed(Failure),
}

/// Who ended a request unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The request itself (its grammar, its text, the model's computation on it).
    Request,
    /// The server is stopping, or the request never ran: sent again (after a restart, or to
    /// another node) it may well succeed.
    Stopping,
    /// The engine failed or stalled while the request ran in it: sent again it may
    /// succeed, or it may be what fails the engine.
    Engine,
}

/// Why the engine ended a request without finishing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    pub cause: Cause,
    /// What it had computed, as its ledger row has it (none when the engine could not say:
    /// a stalled engine's requests are answered from outside it).
    pub usage: Option<Usage>,
}

impl Failure {
    /// This request failed (its grammar, its text, the model's computation on it).
    pub fn request(message: impl Into<String>) -> Self {
        Self::new(message, Cause::Request)
    }

    /// The server cannot finish it: `cause` says whether the engine failed with it in.
    pub fn new(message: impl Into<String>, cause: Cause) -> Self {
        Self {
            message: message.into(),
            cause,
            usage: None,
        }
    }

    pub fn with_usage(self, usage: Usage) -> Self {
        Self {
            usage: Some(usage),
            ..self
        }
    }
}

pub type EventSender = mpsc::UnboundedSender<Event>;
pub type EventReceiver = mpsc::UnboundedReceiver<Event>;
