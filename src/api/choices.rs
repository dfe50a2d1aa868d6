//! A request of several choices (`n`, or several prompts) is several engine requests settled
//! as one: one meter, one ledger row, with the parts' usage summed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::engine::request::{EndReport, Ending, EventReceiver, FinishReason, Usage, UsageSink};
use crate::gateway::Meter;

use super::response::add_usage;

/// One choice to render: its events, the text `echo` puts before it, and whether its
/// usage counts its prompt (a prompt's first choice does; see [`add_usage`]).
///
/// [`add_usage`]: super::response::add_usage
pub struct Choice {
    pub rx: EventReceiver,
    pub echo: Option<String>,
    pub counts_prompt: bool,
}

impl Choice {
    pub fn new(rx: EventReceiver, echo: Option<String>, counts_prompt: bool) -> Self {
        Self {
            rx,
            echo,
            counts_prompt,
        }
    }
}

/// What the parts reported so far.
struct Shared {
    meter: Option<Meter>,
    ack: Option<oneshot::Sender<bool>>,
    left: usize,
    ran: usize,
    /// The engine refused the request (some parts may have been queued, then cancelled).
    refused: bool,
    usage: Usage,
    ending: Option<Ending>,
    first_token_at: Option<Instant>,
}

impl Shared {
    fn settle(&mut self) {
        self.left -= 1;
        if self.left > 0 {
            return;
        }
        let Some(meter) = self.meter.take() else {
            return;
        };
        if self.ran == 0 || self.refused {
            // The queue refused the request: the meter's drop gives everything back and
            // ledgers it as rejected.
            drop(meter);
            return;
        }
        meter.finish(
            EndReport {
                ending: self.ending.unwrap_or(Ending::Cancelled),
                usage: self.usage,
                first_token_at: self.first_token_at,
            },
            self.ack.take(),
        );
    }
}

/// The worse of two endings, for the one ledger row: a failure, else a cancellation, else
/// `length` if any part ran out of tokens, else `stop`.
fn worse(a: Ending, b: Ending) -> Ending {
    let rank = |e: Ending| match e {
        Ending::Failed => 3,
        Ending::Cancelled => 2,
        Ending::Finished(FinishReason::Length) => 1,
        Ending::Finished(FinishReason::Stop) => 0,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// A part's report; dropped unreported (never submitted, or refused), it counts as a part
/// that computed nothing.
struct Part {
    shared: Arc<Mutex<Shared>>,
    reported: bool,
    counts_prompt: bool,
}

impl Part {
    fn report(mut self, r: EndReport) {
        self.reported = true;
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.ran += 1;
        add_usage(&mut s.usage, r.usage, self.counts_prompt);
        s.ending = Some(s.ending.map_or(r.ending, |e| worse(e, r.ending)));
        s.first_token_at = match (s.first_token_at, r.first_token_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        s.settle();
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if !self.reported {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            // Never run (refused, or its request ended first): the request did not finish.
            s.ending = Some(
                s.ending
                    .map_or(Ending::Cancelled, |e| worse(e, Ending::Cancelled)),
            );
            s.settle();
        }
    }
}

/// Marks the request refused (its client is told so): it settles as rejected.
pub struct Refusal(Arc<Mutex<Shared>>);

impl Refusal {
    pub fn refused(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).refused = true;
    }
}

/// `parts` usage sinks that settle `meter` once, when the last of them has reported or been
/// dropped; `ack` hears when its ledger row is committed. Part `i` counts its prompt when
/// `counts_prompt[i]` (see [`add_usage`]).
pub fn split_meter(
    meter: Meter,
    ack: oneshot::Sender<bool>,
    counts_prompt: &[bool],
) -> (Vec<UsageSink>, Refusal) {
    let shared = Arc::new(Mutex::new(Shared {
        meter: Some(meter),
        ack: Some(ack),
        left: counts_prompt.len(),
        ran: 0,
        refused: false,
        usage: Usage::default(),
        ending: None,
        first_token_at: None,
    }));
    let sinks = counts_prompt
        .iter()
        .map(|&counts_prompt| {
            let part = Part {
                shared: shared.clone(),
                reported: false,
                counts_prompt,
            };
            UsageSink::new(move |r| part.report(r))
        })
        .collect();
    (sinks, Refusal(shared))
}
