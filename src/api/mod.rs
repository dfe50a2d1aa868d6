//! The HTTP layer (axum): OpenAI-compatible routes, SSE, request ids, metrics, graceful
//! shutdown. Knows JSON and status codes; never tensors. Errors map to HTTP in `error.rs` only.

mod admin;
mod anthropic;
mod anthropic_batches;
mod anthropic_sse;
mod auth;
mod batch_input;
mod batch_output;
mod batch_results;
mod batch_worker;
mod batches;
pub use batches::BatchSettings;
pub mod body;
mod choices;
mod console;
pub mod cors;
mod embeddings;
pub mod error;
#[doc(hidden)]
pub mod formats;
pub mod fuzz;
pub mod gate;
mod generate;
mod handlers;
mod infill;
mod listen;
mod llama_chain;
mod llama_sampling;
mod native;
mod replay;
mod response;
mod responses;
mod responses_background;
mod responses_events;
mod responses_items;
mod responses_logprobs;
mod responses_sse;
mod side_work;
mod stream;
mod surfaces;
mod text_logprobs;
mod truncation;
pub mod types;
mod utility;
mod workers;
mod workers_batch;

pub use listen::{serve, ConnLimits};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::core::EngineHandle;
use crate::gateway::cache::ResponseCache;
use crate::gateway::Gateway;
use crate::model::{ChatTemplate, Tokenizer};
use crate::structured::{Grammars, ToolFormat};
use error::ApiError;

/// What exists once the model is loaded.
#[derive(Clone)]
pub struct Ready {
    pub engine: EngineHandle,
    /// Shared: a request takes a reference, never a copy of the vocabulary.
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub context_length: usize,
    /// Rows of the model's embedding matrix: every prompt id must be below it.
    pub vocab_size: usize,
    /// Values in one of `/v1/embeddings`' vectors, and how they are pooled.
    pub embedding_length: usize,
    pub pooling: crate::model::Pooling,
    /// Compiles response formats and tool grammars for this vocabulary.
    pub grammars: Arc<Grammars>,
    /// How this model writes tool calls, and whether its template renders tools itself.
    pub tool_format: ToolFormat,
    pub native_tools: bool,
    /// How the model reasons, if it does, and whether replies split it off by default.
    pub reasoner: Option<crate::structured::reasoning::Reasoner>,
    pub split_reasoning: bool,
    /// sha256 of the model file and of the chat template source: part of every response
    /// cache key, so a new model or template never replays old replies.
    pub model_hash: String,
    pub template_hash: String,
}

pub struct AppState {
    pub model_name: String,
    /// Other names requests may give the served model (e.g. Workers AI's
    /// `@cf/meta/llama-3.1-8b-instruct`).
    pub model_aliases: Vec<String>,
    /// The LoRA adapters' names (`--lora`), by the model's index for each: a request that
    /// names one runs with it.
    pub adapters: Vec<String>,
    pub ready: OnceLock<Ready>,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    pub body_limits: body::BodyLimits,
    /// How often an SSE stream with nothing to send sends a comment.
    pub sse_keep_alive: Duration,
    pub started: u64,
    shutting_down: AtomicBool,
    pub gateway: Arc<Gateway>,
    /// Replies of deterministic requests that asked to be cached.
    pub cache: ResponseCache<gate::Recorded>,
    /// Replies of `Idempotency-Key` requests, apart from the response cache's, remembering
    /// the keys whose replies it lost.
    pub idempotency: ResponseCache<gate::Recorded>,
    /// The cache TTL and request timeout of requests whose headers do not set them.
    pub directive_defaults: gate::DirectiveDefaults,
    pub stall_timeout: Duration,
    /// `--metrics-key`: the bearer token `/metrics` asks for (none: open).
    pub metrics_key: Option<String>,
    /// Bound to a loopback address (see [`HttpConfig::loopback`]).
    pub loopback: bool,
    /// `--cors-allow-origin`: the pages that may call the node from a browser.
    pub cors_origins: Vec<String>,
    /// `x-edgeinfer-node` (none when the name is not a valid header value).
    node_header: Option<HeaderValue>,
    /// Wakes the batch worker (a batch created or cancelled).
    pub batch_wake: tokio::sync::Notify,
    /// The Batch API's settings.
    pub batch: BatchSettings,
    /// The Responses API's runs in the background.
    background: responses_background::Running,
    /// Renders and tokenizations answered without generating, a core's worth at a time.
    side_work: side_work::SideWork,
}

/// The HTTP side's settings.
pub struct HttpConfig {
    pub max_body_bytes: usize,
    /// The whole body must arrive within this time (408 beyond).
    pub body_read_timeout: Duration,
    pub sse_keep_alive: Duration,
    pub cache_max_bytes: usize,
    pub idempotency_max_bytes: usize,
    pub default_cache_ttl: Option<Duration>,
    /// The request timeout of requests that send no `cf-aig-request-timeout`.
    pub default_request_timeout: Option<Duration>,
    pub model_aliases: Vec<String>,
    /// The LoRA adapters' names, in the order the model loads them.
    pub adapters: Vec<String>,
    /// How long the engine may hold work without finishing a step before liveness fails.
    pub stall_timeout: Duration,
    /// Sent in every response's `x-edgeinfer-node` header.
    pub node_name: String,
    pub metrics_key: Option<String>,
    pub batch: BatchSettings,
    /// Bound to a loopback address: while no key is required, web pages are refused
    /// (`auth::foreign_page`) but for those of `cors_origins`.
    pub loopback: bool,
    /// `--cors-allow-origin`.
    pub cors_origins: Vec<String>,
}

impl AppState {
    pub fn new(
        model_name: String,
        metrics: PrometheusHandle,
        gateway: Arc<Gateway>,
        config: HttpConfig,
    ) -> Self {
        Self {
            model_name,
            model_aliases: config.model_aliases,
            adapters: config.adapters,
            ready: OnceLock::new(),
            metrics,
            max_body_bytes: config.max_body_bytes,
            sse_keep_alive: config.sse_keep_alive,
            body_limits: body::BodyLimits {
                max_bytes: config.max_body_bytes,
                read_timeout: config.body_read_timeout,
            },
            gateway,
            cache: ResponseCache::new(config.cache_max_bytes),
            idempotency: ResponseCache::remembering(config.idempotency_max_bytes),
            directive_defaults: gate::DirectiveDefaults {
                cache_ttl: config.default_cache_ttl,
                request_timeout: config.default_request_timeout,
            },
            stall_timeout: config.stall_timeout,
            metrics_key: config.metrics_key,
            loopback: config.loopback,
            cors_origins: config.cors_origins,
            node_header: HeaderValue::from_str(&config.node_name).ok(),
            batch_wake: tokio::sync::Notify::new(),
            batch: config.batch,
            background: Default::default(),
            side_work: Default::default(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The loaded model, or 503 while loading or shutting down.
    pub fn ready(&self) -> Result<Ready, ApiError> {
        if self.shutting_down() {
            return Err(ApiError::unavailable("The server is shutting down"));
        }
        let ready = self
            .ready
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("The model is still loading"))?;
        if ready.engine.has_failed() {
            return Err(ApiError::unavailable(
                "The engine failed; the server is restarting",
            ));
        }
        if self.stalled(&ready) {
            return Err(ApiError::unavailable(
                "The engine has stopped making progress; the server is restarting",
            ));
        }
        Ok(ready)
    }

    /// Whether the engine has held work without finishing a step past `--stall-timeout`.
    pub(crate) fn stalled(&self, ready: &Ready) -> bool {
        ready.engine.silent_for() > self.stall_timeout
    }

    /// Requests inside the engine (0 while loading).
    fn in_flight(&self) -> usize {
        self.ready.get().map_or(0, |r| r.engine.in_flight())
    }

    /// Resolves if the engine thread dies.
    async fn engine_failure(&self) {
        loop {
            if let Some(r) = self.ready.get() {
                return r.engine.failure().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The drain is over: the engine ends what it still holds (see `EngineHandle::cut_off`).
    fn cut_off(&self) {
        if let Some(r) = self.ready.get() {
            r.engine.cut_off();
        }
    }
}

/// The request's id (from `x-request-id`, or generated), in every log line about it, and,
/// for a batch's request, the line it is an attempt at (`batch_id/line`: its ledger row
/// supersedes the line's earlier attempts').
#[derive(Clone)]
pub struct RequestId(pub String, pub Option<String>);

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    // Everything but the probes and metrics needs a key when auth is on.
    let keyed = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(utility::models))
        .route("/v1/models/{*model}", get(utility::model))
        .route("/v1/embeddings", post(embeddings::embeddings))
        // Also without the prefix, as llama-server allows.
        .route("/chat/completions", post(handlers::chat_completions))
        .route("/completions", post(handlers::completions))
        .route("/models", get(utility::models))
        .route("/models/{*model}", get(utility::model))
        .route("/embeddings", post(embeddings::embeddings))
        // llama-server's code completion between a prefix and a suffix, and Mistral's.
        .route("/infill", post(infill::infill))
        // llama-server's own completion endpoint (its `/completions` is ours in OpenAI's
        // shape, above).
        .route("/completion", post(native::completion))
        .route("/v1/fim/completions", post(handlers::mistral_fim))
        .route("/v1/messages", post(surfaces::messages))
        .route("/v1/messages/count_tokens", post(surfaces::count_tokens))
        .route("/v1/responses", post(surfaces::responses_create))
        .route(
            "/v1/responses/{id}",
            get(surfaces::responses_get).delete(surfaces::responses_delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses_items::input_items),
        )
        .route("/v1/responses/{id}/cancel", post(responses_items::cancel))
        .route(
            "/client/v4/accounts/{account_id}/ai/run/{*model}",
            post(surfaces::workers_run),
        )
        // Workers AI's OpenAI-compatible path: OpenAI's shapes.
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
            post(handlers::chat_completions),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/completions",
            post(handlers::completions),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/models",
            get(utility::models),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/embeddings",
            post(embeddings::embeddings),
        )
        // The same surfaces through AI Gateway's URLs (a client moves by changing the host).
        .route(
            "/v1/{account_id}/{gateway_id}/workers-ai/{*model}",
            post(surfaces::workers_run),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/workers-ai/v1/chat/completions",
            post(handlers::chat_completions),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/workers-ai/v1/completions",
            post(handlers::completions),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/workers-ai/v1/models",
            get(utility::models),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/workers-ai/v1/embeddings",
            post(embeddings::embeddings),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/openai/chat/completions",
            post(handlers::chat_completions),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/openai/completions",
            post(handlers::completions),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/openai/models",
            get(utility::models),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/openai/embeddings",
            post(embeddings::embeddings),
        )
        .route(
            "/v1/{account_id}/{gateway_id}/compat/chat/completions",
            post(surfaces::gateway_compat),
        )
        // OpenAI's Batch API: uploaded JSONL files, batches run in the background.
        .merge(batches::routes())
        .merge(anthropic_batches::routes())
        .route("/v1/usage", get(admin::usage))
        .route("/tokenize", post(utility::tokenize))
        .route("/detokenize", post(utility::detokenize))
        .route("/tokenizer_info", get(utility::tokenizer_info))
        .route("/props", get(utility::props))
        .route("/apply-template", post(surfaces::apply_template))
        .route("/key/generate", post(admin::generate))
        .route("/key/info", get(admin::key_info))
        .route("/key/update", post(admin::update))
        .route("/key/delete", post(admin::delete))
        .route("/key/list", get(admin::list))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            gate::authenticate,
        ));
    let app = Router::new()
        .merge(keyed)
        .route("/health", get(utility::health))
        .route("/ready", get(utility::ready))
        // The console's page and assets hold no data; what it shows needs the API's key.
        .route("/", get(console::index))
        .route("/console/app.js", get(console::app_js))
        .route("/console/app.css", get(console::app_css))
        .route("/metrics", get(utility::metrics))
        .fallback(utility::not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), body::guard))
        .layer(middleware::from_fn(surface_errors));
    // A preflight is answered before any key is asked for, and errors too are readable by
    // the pages let in.
    let app = match cors::layer(&state.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    // Outermost: every answer, a preflight's included, has its id and log line.
    app.layer(middleware::from_fn_with_state(state.clone(), request_id))
        .with_state(state)
}

/// Errors in the envelope of the surface a path belongs to: Anthropic's under
/// `/v1/messages`, Cloudflare's under Workers AI's `/client/v4/accounts/{id}/ai/run/` (and
/// AI Gateway's `/v1/{account}/{gateway}/workers-ai/{model}`), OpenAI's elsewhere (as every
/// layer and handler writes them).
async fn surface_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let anthropic = path.starts_with("/v1/messages");
    let segments: Vec<&str> = path.split('/').take(6).collect();
    let gateway_run = matches!(segments[..], ["", "v1", _, _, "workers-ai", s] if s != "v1");
    let workers = (path.starts_with("/client/v4/") && !path.contains("/ai/v1/")) || gateway_run;
    let resp = next.run(req).await;
    if anthropic {
        error::to_anthropic(resp).await
    } else if workers {
        error::to_workers(resp).await
    } else {
        error::to_openai(resp).await
    }
}

/// Honours or generates `x-request-id`, echoes it, names the node (`x-edgeinfer-node`), and logs sizes, status and timing (never
/// bodies: prompts and completions stay private).
async fn request_id(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(new_id);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let size = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // The agent's session and the caller's metadata label the log line (never bodies).
    let (session, meta) = (
        log_header(req.headers(), "x-session-id"),
        log_header(req.headers(), "cf-aig-metadata"),
    );
    let attempt = req
        .extensions()
        .get::<gate::BatchCall>()
        .map(|c| c.attempt.clone());
    req.extensions_mut().insert(RequestId(id.clone(), attempt));
    let started = Instant::now();
    let mut resp = next.run(req).await;
    tracing::info!(request_id = %id, %method, %path, body_bytes = size,
        status = resp.status().as_u16(), seconds = started.elapsed().as_secs_f64(),
        session_id = %session, metadata = %meta, "http request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    if let Some(node) = &state.node_header {
        resp.headers_mut().insert("x-edgeinfer-node", node.clone());
    }
    resp
}

fn log_header(h: &axum::http::HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 4096)
        .unwrap_or("")
        .to_string()
}

pub(crate) fn new_id() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{n:032x}")
}

/// Installs the Prometheus recorder with histogram buckets, then names every series (ours
/// and vLLM's, see [`crate::telemetry`]) so scrapers see them before the first request.
pub fn install_metrics(
    model_name: &str,
    cache: crate::telemetry::CacheShape,
    adapters: &[String],
) -> anyhow::Result<PrometheusHandle> {
    let latency = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0, 300.0, 600.0, 1800.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .install_recorder()?;
    // Histogram samples wait in the recorder until upkeep drains them; without it a node
    // that nobody scrapes grows by every token's latency sample (found by the soak).
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("edgeinfer-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })?;
    crate::telemetry::init(model_name, cache, adapters);
    Ok(handle)
}
