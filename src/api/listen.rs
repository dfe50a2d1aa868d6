//! Serving connections (HTTP/1.1): the accept loop with its connection limit, header timeout,
//! graceful drain on SIGINT/SIGTERM and stop on an engine failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::error::ApiError;
use super::{batch_worker, router, AppState};

/// How connections are accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A client must send a request's whole header within this time after the connection
    /// opens or goes idle, or the connection is closed (slow clients, idle keep-alives).
    pub header_read_timeout: Duration,
    /// Open connections at most; beyond it a new one gets a 503 and is closed.
    pub max_connections: usize,
}

/// Serves until SIGINT/SIGTERM, then drains: `/ready` and new requests get 503 at once (`/health` stays 200, draining)
/// (new connections are still accepted, so probes see the 503), running requests finish
/// for up to `drain` (a second signal ends the drain at once), and it returns. If the engine thread dies it stops the same way, with
/// a short drain, and returns an error so the process exits non-zero.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    drain: Duration,
    limits: ConnLimits,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let app = router(state.clone());
    batch_worker::spawn(state.clone(), app.clone(), state.batch.concurrency);
    tokio::spawn(watch_for_stalls(state.clone()));
    // HTTP/1.1 only: the automatic protocol detection waits for a connection's first 24
    // bytes with no timer, and an HTTP/2 connection has no header-read timeout, so either
    // would let silent connections hold every slot. Here the header-read timeout runs from
    // the connection's opening, bytes or none.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let failure_state = state.clone();
    let failure = failure_state.engine_failure();
    tokio::pin!(failure);
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut engine_failed = false;
    let mut forced = false;
    let mut first_signal = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let (stream, _peer) = tokio::select! {
            conn = listener.accept() => match conn {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait, never spin or exit.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut signal, if !forced => {
                if deadline.is_none() {
                    first_signal = tokio::time::Instant::now();
                    tracing::info!(in_flight = state.in_flight(), "shutdown requested: readiness 503, draining running requests");
                    state.begin_shutdown();
                    deadline = Some(tokio::time::Instant::now() + drain);
                } else if first_signal.elapsed() >= Duration::from_secs(1) {
                    // A second signal (Ctrl-C twice, an impatient supervisor): the drain
                    // ends now, and the running requests are ended as at its timeout. (Not
                    // one a moment after the first: a wrapper forwarding the terminal's own.)
                    tracing::warn!(in_flight = state.in_flight(), "second shutdown signal: ending the drain now");
                    forced = true;
                    deadline = Some(tokio::time::Instant::now());
                }
                signal.set(shutdown_signal());
                continue;
            }
            _ = &mut failure, if !engine_failed => {
                tracing::error!("the engine thread failed: stopping");
                engine_failed = true;
                state.begin_shutdown();
                let short = tokio::time::Instant::now() + Duration::from_secs(2);
                deadline = Some(deadline.map_or(short, |d| d.min(short)));
                continue;
            }
            _ = tick.tick(), if deadline.is_some() => {
                if state.in_flight() == 0 || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    break;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(stream));
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    // The engine is idle (or time is up): close the listener and let every connection
    // finish the response it is writing (streams' last events, ledger commits). Requests
    // still running when time is up are ended by the engine, each told so and metered with
    // what it computed: the connections then have a moment to write those endings.
    drop(listener);
    let mut rest = deadline
        .map_or(drain, |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
        })
        .max(Duration::from_millis(500));
    if state.in_flight() > 0 {
        tracing::warn!(
            in_flight = state.in_flight(),
            "drain timeout reached; ending the requests still running"
        );
        state.cut_off();
        // Each ended request's ledger row is queued before it stops counting as in flight,
        // so once none is, the flush below writes them all.
        // (The engine ends them between steps: a long prefill step is waited for.)
        let ended = tokio::time::Instant::now() + Duration::from_secs(10);
        while state.in_flight() > 0 && tokio::time::Instant::now() < ended {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rest = rest.max(Duration::from_secs(3));
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(rest) => {
            tracing::warn!("connections still open at the exit");
        }
    }
    // What the last requests computed (those cut off too: their rows were queued as the
    // engine dropped them) is in the ledger before the exit.
    let flushed = state.gateway.ledger.flush();
    if !matches!(
        tokio::time::timeout(Duration::from_secs(5), flushed).await,
        Ok(Ok(true))
    ) {
        tracing::error!("the ledger's last rows may not have been written before the exit");
    }
    if engine_failed {
        anyhow::bail!("the engine thread failed (an internal error); exiting so a supervisor can restart the server");
    }
    Ok(())
}

/// An engine stuck in a step for longer than `--stall-timeout` fails liveness (a supervisor
/// restarts the server); the requests it holds are told so at once, so their clients (a
/// stream kept open by keep-alive comments) get an ending instead of waiting for ever.
async fn watch_for_stalls(state: Arc<AppState>) {
    let mut told = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(ready) = state.ready.get() else {
            continue;
        };
        let stalled = state.stalled(ready);
        if stalled && !told {
            let n = ready.engine.abandon(
                "the engine has stopped making progress; the server is restarting, retry the request",
            );
            tracing::error!(
                requests = n,
                "the engine is stalled: its requests were ended"
            );
        }
        told = stalled;
    }
}

/// Over `--max-connections`: a short 503 in OpenAI's shape, then close.
async fn refuse_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = ApiError::unavailable("Too many open connections; retry shortly")
        .body()
        .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No SIGINT handler: rely on SIGTERM only, never shut down by accident.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
