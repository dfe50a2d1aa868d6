//! The engine thread's liveness: a heartbeat that `/health` reads without touching the
//! thread, and the faults tests inject (a panic, a stalled step) to prove the probes right.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The engine thread's pulse: when it last finished a step, or took work while idle (0 while
/// it waits for work, which is not a stall).
#[derive(Clone, Default)]
pub(super) struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    pub(super) fn beat(&self) {
        let ms = Self::epoch().elapsed().as_millis() as u64;
        self.0.store(ms + 1, Ordering::Relaxed);
    }

    pub(super) fn idle(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// How long the engine has held work without finishing a step.
    pub(super) fn silent_for(&self) -> Duration {
        match self.0.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            beat => {
                let now = Self::epoch().elapsed().as_millis() as u64 + 1;
                Duration::from_millis(now.saturating_sub(beat))
            }
        }
    }
}

/// A fault to inject for tests, from `EDGEINFER_FAULT`: `engine-panic-at-step=N` (the
/// engine thread panics outside the forward pass at its N-th step),
/// `engine-stall-at-step=N` (it stops there, as a hung step would), or
/// `engine-panic-on-max-tokens=N` (it panics at any step that runs a request with
/// `max_tokens` N: a request that meets an engine bug). Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    PanicAt(u64),
    StallAt(u64),
    PanicOnMaxTokens(usize),
}

pub(super) fn injected_fault() -> Option<Fault> {
    let spec = std::env::var("EDGEINFER_FAULT").ok()?;
    let fault = if let Some(n) = spec.strip_prefix("engine-panic-at-step=") {
        Fault::PanicAt(n.parse().ok()?)
    } else if let Some(n) = spec.strip_prefix("engine-panic-on-max-tokens=") {
        Fault::PanicOnMaxTokens(n.parse().ok()?)
    } else {
        Fault::StallAt(spec.strip_prefix("engine-stall-at-step=")?.parse().ok()?)
    };
    tracing::warn!(?fault, "EDGEINFER_FAULT: fault injection is on");
    Some(fault)
}
