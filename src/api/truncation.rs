//! The Responses API's `truncation: "auto"`: a conversation whose prompt leaves no room for
//! the reply drops its oldest turns (the instructions stay) until it fits, instead of a 400.
//! A turn starts at a user or assistant message: an assistant's calls go with their outputs.

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
/// completion loses its oldest turns, as few as leave [`Fit::room`]. When even the last turn
/// does not fit, the whole prompt is returned, for the usual 400.
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
    let fitted = earliest(&assistants, fits_from)
        .or(found)
        .map(|(_, fitted)| fitted);
    Ok(fitted.unwrap_or(whole))
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
