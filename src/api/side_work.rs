//! Work answered without generating (`/tokenize`, `/detokenize`, `/apply-template`,
//! Anthropic's `count_tokens`): rendered and tokenized on the blocking threads, which run
//! beside the engine's, so at most as many at once as the machine has cores. The rest wait
//! their turn, for a while, then get the full node's 429.

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::ApiError;

/// How long a request waits for its turn.
const WAIT: Duration = Duration::from_secs(10);

pub struct SideWork {
    slots: Arc<Semaphore>,
    wait: Duration,
}

impl Default for SideWork {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::new(cores, WAIT)
    }
}

impl SideWork {
    pub fn new(slots: usize, wait: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            wait,
        }
    }

    /// Runs `f` on a blocking thread when a slot is free: 429 if none frees up in time. The
    /// slot is the work's until it ends, also when its client has gone meanwhile.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let slot = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::overloaded())?
            .map_err(|_| ApiError::internal("the side work's slots are closed"))?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            f()
        })
        .await
        .map_err(|e| ApiError::internal(format!("the work failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::SideWork;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn work_beyond_the_slots_waits_its_turn_then_is_refused() {
        let work = Arc::new(SideWork::new(1, Duration::from_millis(200)));
        let (started, release) = (
            Arc::new(tokio::sync::Notify::new()),
            std::sync::mpsc::channel::<()>(),
        );
        let (tx, rx) = release;
        let busy = {
            let (work, started) = (work.clone(), started.clone());
            tokio::spawn(async move {
                work.run(move || {
                    started.notify_one();
                    rx.recv().ok();
                })
                .await
            })
        };
        started.notified().await;
        // The one slot is taken: the next waits 200 ms, then is refused as a full node.
        let refused = work.run(|| 1).await.unwrap_err();
        assert_eq!(refused.status.as_u16(), 429);
        // A caller that leaves (its client gone) leaves its work the slot until it ends.
        busy.abort();
        assert!(busy.await.unwrap_err().is_cancelled());
        assert_eq!(work.run(|| 1).await.unwrap_err().status.as_u16(), 429);
        // Once it is free, work runs.
        tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let ran = loop {
            match work.run(|| 2).await {
                Ok(v) => break v,
                Err(_) if std::time::Instant::now() < deadline => continue,
                Err(e) => panic!("{}", e.message),
            }
        };
        assert_eq!(ran, 2);
    }
}
