//! The Responses API's `truncation: "auto"`: a conversation whose prompt leaves no room for
//! the reply drops its oldest turns (the instructions stay) until it fits, instead of a 400.
//! A turn starts at a user or assistant message: an assistant's calls go with their outputs.
//!
//! The turns go in steps (see [`steady`]): an agent at the limit adds a turn per request, and
//! a cut that moved with each would change the prompt's start every time, so the prefix cache
//! would serve none of the history kept. A cut that stays put over the next turns keeps it.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::handlers::render;
use super::Ready;
use crate::model::template::Message;

/// What the prompt must leave room for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fit {
    /// The most tokens a sequence holds (the model's context, or the KV cache if smaller).
    pub limit: usize,
    /// The completion the request asked for, if it did.
    pub max_tokens: Option<usize>,
}

impl Fit {
    /// Room a truncated prompt leaves: what was asked for, else a quarter of the context (a
    /// conversation cut to leave one token would end its reply at once).
    fn room(&self) -> usize {
        self.max_tokens.unwrap_or(self.limit / 4).max(1)
    }
}

/// The chat prompt (see [`render`]); with `fit`, a conversation that leaves no room for the
/// completion loses its oldest turns: as few as leave [`Fit::room`], or somewhat more, in the
/// steps [`steady`] takes. When even the last turn does not fit, the whole prompt is
/// returned, for the usual 400.
pub(super) fn render_fitting(
    r: &Ready,
    messages: Vec<Message>,
    tools: Vec<Value>,
    kwargs: &Map<String, Value>,
    continues: bool,
    fit: Option<Fit>,
) -> Result<(Vec<u32>, bool), ApiError> {
    let Some(fit) = fit else {
        return render(r, messages, tools, kwargs, continues);
    };
    let whole = render(r, messages.clone(), tools.clone(), kwargs, continues)?;
    if whole.0.len().saturating_add(fit.max_tokens.unwrap_or(1)) <= fit.limit {
        return Ok(whole);
    }
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let cuts_at = |role: &str| -> Vec<usize> {
        (system + 1..messages.len())
            .filter(|&i| messages[i].role == role)
            .collect()
    };
    let fits_from = |at: usize| {
        let kept = [&messages[..system], &messages[at..]].concat();
        render(r, kept, tools.clone(), kwargs, continues)
            .ok()
            .filter(|(prompt, _)| prompt.len().saturating_add(fit.room()) <= fit.limit)
    };
    // The earliest user turn the rest fits from (every template takes a conversation that
    // starts with one), then, between it and the user turn before, the earliest assistant
    // turn, for templates that take a conversation starting with one (those that insist on
    // alternating roles refuse them all).
    let users = cuts_at("user");
    let found = earliest(&users, fits_from);
    let (after, before) = match found {
        Some((j, _)) => (j.checked_sub(1).map_or(system, |p| users[p]), users[j]),
        None => (users.last().copied().unwrap_or(system), messages.len()),
    };
    let assistants: Vec<usize> = cuts_at("assistant")
        .into_iter()
        .filter(|&i| i > after && i < before)
        .collect();
    let least = earliest(&assistants, fits_from)
        .map(|(k, fitted)| (assistants[k], fitted))
        .or(found.map(|(j, fitted)| (users[j], fitted)));
    let Some((cut, fitted)) = least else {
        return Ok(whole);
    };
    Ok(
        steady(r, &messages[system..], cut - system, fit.limit / 4, |at| {
            fits_from(system + at)
        })
        .unwrap_or(fitted),
    )
}

/// The cut to take when `least` is the latest turn that must go first, so that the cut stays
/// put while the conversation grows: the turns are weighed (in tokens, from the first one
/// past the instructions, which does not change as turns are added), and the cut falls at
/// the first turn that starts past the next multiple of `step` after `least`'s start. A
/// request with one more turn then cuts at the same place until its `least` passes that
/// multiple. At most `step` more tokens go than must; when a long turn straddles the
/// multiple and more would, the cut is `least` (`None`), as it is when no turn starts past
/// the multiple. A turn the template refuses to start with (see [`render_fitting`]) is
/// passed over for the next.
fn steady<T>(
    r: &Ready,
    turns: &[Message],
    least: usize,
    step: usize,
    fits_from: impl Fn(usize) -> Option<T>,
) -> Option<T> {
    let step = step.max(1);
    let tokens = |text: &str| r.tokenizer.encode(text, false).map_or(0, |ids| ids.len());
    // Where each turn starts, in tokens: its content, its calls, and a few for its markers.
    let mut starts = Vec::with_capacity(turns.len());
    let mut at = 0usize;
    for m in turns {
        starts.push(at);
        let calls = m
            .tool_calls
            .as_ref()
            .map_or(0, |c| tokens(&Value::from(c.clone()).to_string()));
        at = at.saturating_add(tokens(&m.content) + calls + 4);
    }
    let past = (starts[least] / step + 1) * step;
    (least + 1..turns.len())
        .filter(|&i| matches!(turns[i].role.as_str(), "user" | "assistant"))
        .skip_while(|&i| starts[i] < past)
        .take_while(|&i| starts[i] - starts[least] <= step)
        .find_map(fits_from)
}

/// The earliest of `cuts` the rest fits from (a later cut keeps less: it fits if an earlier
/// one does), by bisection, with its prompt.
fn earliest<T>(cuts: &[usize], fits_from: impl Fn(usize) -> Option<T>) -> Option<(usize, T)> {
    let (mut lo, mut hi, mut best) = (0, cuts.len(), None);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match fits_from(cuts[mid]) {
            Some(fitted) => {
                best = Some((mid, fitted));
                hi = mid;
            }
            None => lo = mid + 1,
        }
    }
    best
}
