//! The command line: subcommands and flags, each with an environment variable and a help text
//! that explains its trade-off. Defaults live here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgeinfer",
    version,
    about = "A self-hosted edge inference node for quantized Llama/Mistral GGUF models"
)]
pub struct Cli {
    /// Worker threads for the model's matrix products. More threads speed up prompts until
    /// they contend with each other (and with the HTTP runtime) for cores; 0 means one per core.
    #[arg(long, env = "EDGEINFER_THREADS", default_value_t = 0, global = true)]
    pub threads: usize,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download a model (a known name or HF_REPO[@REVISION]:FILE) into the models directory and
    /// verify its checksum. With no argument, the default model.
    Pull(PullArgs),
    /// Generate text from a prompt on the command line, streaming it to stdout.
    Generate(GenerateArgs),
    /// List the models this build knows by name.
    Models,
    /// Serve OpenAI-compatible chat completions over HTTP with continuous batching.
    Serve(Box<ServeArgs>),
    /// Manage API keys in the key store, offline (the same store `serve --db` uses; a running
    /// server sees changes on its next request).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the request ledger's totals by day, model and key.
    Usage(UsageArgs),
    /// Write a random-weight GGUF of a real model's shape (for benchmarks and tests), with the
    /// default model's vocabulary, tokenizer and chat template.
    Synth(SynthArgs),
    /// Check a backend (`--device`) against the CPU and measure it: logits agreement,
    /// batching invariance, decode tok/s at several stream counts, prefill tok/s. Prints one
    /// JSON object per check.
    BackendCheck(BackendCheckArgs),
}

#[derive(Debug, Args)]
pub struct BackendCheckArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// Compare the device's logits with the CPU's over a prompt and greedy steps (loads the
    /// model twice: use a small file).
    #[arg(long)]
    pub compare: bool,
    /// Check batching invariance on the device: prompts alone against packed together.
    #[arg(long)]
    pub invariance: bool,
    /// Measure decode throughput at these stream counts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// Prompt length before the timed decode steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps per stream count.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Measure prefill throughput of one prompt of this many tokens.
    #[arg(long)]
    pub prefill: Option<usize>,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// llama-3.2-1b, llama-3.2-3b, llama-3.1-8b or mistral-7b.
    #[arg(long, required_unless_present_any = ["vocab_only", "lora_for"])]
    pub shape: Option<String>,
    /// Write a random LoRA adapter for this model file instead (every linear layer of every
    /// block, `--rank`, alpha 2 × rank), for trying `serve --lora`.
    #[arg(long, conflicts_with_all = ["shape", "vocab_only"])]
    pub lora_for: Option<PathBuf>,
    /// The adapter's rank (with `--lora-for`).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// How far the adapter moves each layer's output, relative to its input (with
    /// `--lora-for`).
    #[arg(long, default_value_t = 0.05)]
    pub strength: f32,
    /// Write only the donor's vocabulary, tokenizer and chat template, with no tensors: a
    /// small donor (about 2 MiB) to carry to a machine that has no model.
    #[arg(long)]
    pub vocab_only: bool,
    /// Write only this many layers (a small file with the real widths, e.g. for tests).
    #[arg(long)]
    pub layers: Option<usize>,
    /// q4_k_m (llama.cpp's Q4_K_M mix), q4_0, q8_0 or f16.
    #[arg(long, default_value = "q4_k_m")]
    pub quant: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The context length written into the file.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// The GGUF whose vocabulary, tokenizer and chat template are copied (default: the default
    /// model, fetched if missing).
    #[arg(long)]
    pub donor: Option<PathBuf>,
    #[arg(long, env = "EDGEINFER_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
}

#[path = "config_keys.rs"]
mod keys;
pub use keys::*;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub source: ModelArgs,

    /// Address to bind. Loopback by default: expose the node deliberately (0.0.0.0) behind
    /// your own network policy.
    #[arg(long, env = "EDGEINFER_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to bind (0 picks a free one; the chosen address is logged).
    #[arg(long, env = "EDGEINFER_PORT", default_value_t = 8080)]
    pub port: u16,

    /// The model name clients send and see in responses. Defaults to the manifest name, or the
    /// file's stem for a path.
    #[arg(long, env = "EDGEINFER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Another name requests may give the served model, e.g. a Workers AI model id
    /// (`@cf/meta/llama-3.1-8b-instruct`) so code written for the vendor moves by changing only
    /// the base URL. Repeat the flag, or separate names with commas in the variable.
    #[arg(long, env = "EDGEINFER_MODEL_ALIASES", value_delimiter = ',')]
    pub model_alias: Vec<String>,

    /// A LoRA adapter served beside the base model, as `NAME=PATH` (a GGUF adapter, as
    /// llama.cpp's `convert_lora_to_gguf.py` writes it): a request whose `model` is NAME runs
    /// with it, in the same batches as the base model's. Repeat the flag, or separate them
    /// with commas in the variable. CPU only for now.
    #[arg(long = "lora", env = "EDGEINFER_LORA", value_delimiter = ',', value_parser = parse_lora)]
    pub lora: Vec<LoraArg>,

    /// This node's name, sent in every response's `x-edgeinfer-node` header so a client behind
    /// a balancer sees which node answered. Defaults to the host name.
    #[arg(long, env = "EDGEINFER_NODE_NAME")]
    pub node_name: Option<String>,

    /// Most sequences decoded together. More raises aggregate throughput (weights are read once
    /// per step for all of them) at the cost of each stream's speed and of KV memory.
    #[arg(long, env = "EDGEINFER_MAX_BATCH_SIZE", default_value_t = 16)]
    pub max_batch_size: usize,

    /// Most tokens computed per step (decodes plus prefill chunks). Larger chunks prefill long
    /// prompts faster; smaller ones keep running streams smooth while a prompt is read.
    #[arg(long, env = "EDGEINFER_MAX_BATCH_TOKENS", default_value_t = 256)]
    pub max_batch_tokens: usize,

    /// Positions the shared KV cache holds across all sequences (memory: about 23 KB per
    /// position for the default model). A request's prompt plus max_tokens must fit in it;
    /// when it fills, the newest sequences are preempted and recomputed later.
    #[arg(long, env = "EDGEINFER_KV_CACHE_TOKENS", default_value_t = 16384)]
    pub kv_cache_tokens: usize,

    /// Positions per KV block. Smaller blocks waste less memory per sequence; larger ones cost
    /// less bookkeeping.
    #[arg(long, env = "EDGEINFER_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// Turn off automatic prefix caching. With it on (the default), full KV blocks of earlier
    /// requests stay in the KV cache until their memory is needed, and a request whose prompt
    /// starts with the same tokens (a shared system prompt, an agent's history) skips
    /// recomputing them. Off: every prompt is computed in full.
    #[arg(long, env = "EDGEINFER_NO_PREFIX_CACHE", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_prefix_cache: bool,

    /// Speculative decoding by prompt lookup: when a decoding sequence's last tokens occurred
    /// earlier in its prompt or output, up to this many of the tokens that followed them are
    /// verified in the same step, and kept while they equal what is sampled (the output is
    /// unchanged; it comes faster when a reply repeats its context). Drafts run only in
    /// steps of at most 4 sequences, and a sequence whose drafts fail pauses them. 0 turns
    /// it off. Default: 4 on the CPU, whose kernels give a row the same result whatever the
    /// step's size; 0 on CUDA, where candle's matmul picks its kernel by the step's row count
    /// (so a draft could flip a near-tie and change a reply).
    #[arg(long, env = "EDGEINFER_SPECULATE")]
    pub speculate: Option<usize>,

    /// How `/v1/embeddings` pools a text's final hidden states into one vector: `mean`,
    /// `cls` (the first token's) or `last` (the last token's). Default: what the model file
    /// declares (`{arch}.pooling_type`, set by embedding models), else `mean`.
    #[arg(long, env = "EDGEINFER_POOLING")]
    pub pooling: Option<crate::model::Pooling>,

    /// A reasoning model's thinking (`<think>...</think>` or `[THINK]...[/THINK]`): `auto`
    /// returns it apart, as `reasoning_content` (Responses: `reasoning` items); `none`
    /// leaves it in the reply's text. Requests may override it (Anthropic's by `thinking`).
    #[arg(long, env = "EDGEINFER_REASONING_FORMAT", default_value = "auto",
          value_parser = ["auto", "none"])]
    pub reasoning_format: String,

    /// Tokens low-priority prompts (a batch's, `x-edgeinfer-priority: low`) compute a step
    /// at most, together (0: `--max-batch-tokens`). An arriving interactive request waits for
    /// the step under way: smaller chunks bound that wait (on a large model on CPU a whole
    /// chunk is seconds). With interactive requests near, they take at most 1/16 of
    /// `--max-batch-tokens`, and never more than this. Default: 64 on the CPU, where it cost
    /// background throughput nothing measurable; 0 on CUDA (unmeasured there, and a GPU step
    /// is short anyway).
    #[arg(long, env = "EDGEINFER_BACKGROUND_CHUNK_TOKENS")]
    pub background_chunk_tokens: Option<usize>,

    /// Requests allowed to wait for a slot in the running batch (in flight at most:
    /// `--max-batch-size` plus this); beyond it clients get 429 with Retry-After at once, so
    /// overload sheds quickly instead of queueing without bound. 0: never wait, for nodes
    /// that must keep time to first token low under a flood.
    #[arg(long, env = "EDGEINFER_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,

    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, env = "EDGEINFER_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Seconds a client has to send a request's whole body once its header is in (408
    /// beyond): a client trickling its body cannot hold a connection for ever.
    #[arg(long, env = "EDGEINFER_BODY_READ_TIMEOUT", default_value_t = 30)]
    pub body_read_timeout: u64,

    /// Seconds between SSE comments on a stream with nothing else to send (queued, in a
    /// long prefill), so proxies and clients do not time it out.
    #[arg(long, env = "EDGEINFER_SSE_KEEP_ALIVE", default_value_t = 15)]
    pub sse_keep_alive: u64,

    /// Seconds a client has to send a request's whole header, after connecting or after its
    /// previous response (idle keep-alive connections close then too). Guards against
    /// slowloris clients that hold sockets by trickling header bytes.
    #[arg(long, env = "EDGEINFER_HEADER_READ_TIMEOUT", default_value_t = 10)]
    pub header_read_timeout: u64,

    /// Open connections at most; a new one beyond it gets a 503 and is closed.
    #[arg(long, env = "EDGEINFER_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Seconds the engine may hold work without finishing a step before `/health` (liveness)
    /// answers 503 `engine_stalled`. Allow for the longest prefill chunk of the model served.
    #[arg(long, env = "EDGEINFER_STALL_TIMEOUT", default_value_t = 120)]
    pub stall_timeout: u64,

    /// Seconds to let running requests finish after SIGINT/SIGTERM before exiting (a second
    /// signal ends the drain at once).
    #[arg(long, env = "EDGEINFER_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    #[command(flatten)]
    pub store: StoreArgs,

    /// The master key: guards the admin routes (/key/*) and turns key checks on. Keys are
    /// also required whenever the key store holds any.
    #[arg(long, env = "EDGEINFER_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,

    /// Serve a non-loopback address without keys. Without it the server refuses to start
    /// on such an address unless keys are on.
    #[arg(long, env = "EDGEINFER_INSECURE_NO_AUTH", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_no_auth: bool,

    /// Prices per model, a JSON file: {"MODEL or *": {"input": 0.15, "cached_input": 0.075,
    /// "output": 0.6, "cached_response": 0}} in USD per million tokens. Without it requests
    /// cost 0 (tokens are still metered).
    #[arg(long, env = "EDGEINFER_PRICES")]
    pub prices: Option<PathBuf>,

    /// Tokens per minute for the whole server, reserved at admission like a key's.
    #[arg(long, env = "EDGEINFER_TPM_LIMIT")]
    pub tpm_limit: Option<u64>,

    /// Requests per minute for the whole server.
    #[arg(long, env = "EDGEINFER_RPM_LIMIT")]
    pub rpm_limit: Option<u64>,

    /// Response-cache TTL in seconds for requests that send no `cf-aig-cache-ttl`
    /// (0: only requests that ask are cached). Only deterministic requests (temperature 0
    /// or a seed) are ever cached.
    #[arg(long, env = "EDGEINFER_CACHE_TTL", default_value_t = 0)]
    pub cache_ttl: u64,

    /// A bearer token `/metrics` requires (the master key also works); without it `/metrics`
    /// is open, and its gateway series show each key's volumes by token prefix.
    #[arg(long, env = "EDGEINFER_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,

    /// Web pages that may call the node from a browser (CORS): their origins as browsers
    /// send them (`https://app.example.com`), or `*` for any. Repeat the flag, or separate
    /// origins with commas in the variable. None by default.
    #[arg(long, env = "EDGEINFER_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,

    /// Memory the replies kept for `Idempotency-Key` retries may hold (24 hours each, least
    /// recently used out first; a retry whose reply is gone gets 409, never a new generation).
    #[arg(long, env = "EDGEINFER_IDEMPOTENCY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub idempotency_max_bytes: usize,

    /// Milliseconds a request may wait for the first part of its response (a whole reply,
    /// or a stream's first token) before it is cancelled and answered 504, for requests
    /// that send no `cf-aig-request-timeout` header (0: no limit).
    #[arg(long, env = "EDGEINFER_REQUEST_TIMEOUT_MS", default_value_t = 0)]
    pub request_timeout_ms: u64,

    /// Memory the response cache may hold, in bytes; least recently used replies go first.
    #[arg(long, env = "EDGEINFER_CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_max_bytes: usize,

    /// Bytes the Batch API's files (uploads and batch results) of one key may hold together;
    /// an upload past it gets a 400 until files are deleted or expire (0: no limit). Batch
    /// results are always written, and count against it.
    #[arg(long, env = "EDGEINFER_FILE_STORAGE_PER_KEY", default_value_t = 10 << 30)]
    pub file_storage_per_key: u64,

    /// Days a stored Responses-API response (and its conversation's text) is kept: older
    /// ones are deleted and answer 404 (0: kept until deleted).
    #[arg(long, env = "EDGEINFER_RESPONSES_RETENTION_DAYS", default_value_t = 30)]
    pub responses_retention_days: u64,
    /// Days of per-request ledger rows kept (UTC days before today's): older rows are folded
    /// into daily totals by model and key, which usage reports and budgets read, so they stay
    /// exact; request ids, sessions, metadata and timings go (0: every row is kept).
    #[arg(long, env = "EDGEINFER_LEDGER_RETENTION_DAYS", default_value_t = 90)]
    pub ledger_retention_days: u32,
}

/// Most draft tokens `--speculate` may ask for.
const MAX_SPECULATE: usize = 16;

impl ServeArgs {
    /// Checks budgets that must hold together.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch_size == 0 || self.block_size == 0 || self.kv_cache_tokens == 0 {
            return Err(
                "--max-batch-size, --block-size and --kv-cache-tokens must be positive".into(),
            );
        }
        if self.max_batch_tokens < self.max_batch_size {
            return Err(format!(
                "--max-batch-tokens ({}) must be at least --max-batch-size ({}): every running sequence decodes one token per step",
                self.max_batch_tokens, self.max_batch_size
            ));
        }
        if self.header_read_timeout == 0
            || self.stall_timeout == 0
            || self.body_read_timeout == 0
            || self.sse_keep_alive == 0
            || self.max_connections == 0
        {
            return Err(
                "--header-read-timeout, --body-read-timeout, --sse-keep-alive and --max-connections must be positive"
                    .into(),
            );
        }
        if let Some(k) = self.speculate.filter(|&k| k > MAX_SPECULATE) {
            return Err(format!(
                "--speculate ({k}) must be at most {MAX_SPECULATE}: a longer draft is rarely kept whole"
            ));
        }
        if self.master_key.as_deref().is_some_and(|k| k.len() < 8) {
            return Err("--master-key must have at least 8 characters".into());
        }
        // A key no client can send (a header holds no control character, and presented keys
        // are trimmed) would lock every request out: a key read from a file keeps its newline.
        let sendable =
            |k: &str| k.trim() == k && k.chars().all(|c| c.is_ascii() && !c.is_ascii_control());
        for (flag, key) in [
            ("--master-key", &self.master_key),
            ("--metrics-key", &self.metrics_key),
        ] {
            if key.as_deref().is_some_and(|k| !sendable(k)) {
                return Err(format!(
                    "{flag} must be printable ASCII with no space at either end (a key read from a file keeps its trailing newline: strip it)"
                ));
            }
        }
        let min = crate::gateway::retention::MIN_DAYS;
        if (1..min).contains(&self.ledger_retention_days) {
            return Err(format!(
                "--ledger-retention-days must be 0 (keep every row) or at least {min}: a batch line's attempts can span a day"
            ));
        }
        if self.idempotency_max_bytes == 0 {
            return Err("--idempotency-max-bytes must be positive".into());
        }
        if self.request_timeout_ms > 3_600_000 {
            return Err("--request-timeout-ms must be at most 3600000 (an hour)".into());
        }
        if self
            .metrics_key
            .as_deref()
            .is_some_and(|k| !k.is_empty() && k.len() < 8)
        {
            return Err("--metrics-key must have at least 8 characters".into());
        }
        for origin in &self.cors_allow_origin {
            crate::api::cors::check_origin(origin)?;
        }
        if self.kv_cache_tokens < self.max_batch_tokens {
            return Err(format!(
                "--kv-cache-tokens ({}) must be at least --max-batch-tokens ({})",
                self.kv_cache_tokens, self.max_batch_tokens
            ));
        }
        // Sizes that would overflow, or round the KV cache up to a block far past its size.
        for (flag, value, most) in [
            (
                "--block-size",
                self.block_size,
                1024.min(self.kv_cache_tokens),
            ),
            ("--max-queue", self.max_queue, 1 << 20),
            ("--max-connections", self.max_connections, 1 << 20),
            ("--shutdown-timeout", self.shutdown_timeout as usize, 86_400),
            // Seconds added to a clock's now: past a day they mean nothing, and past
            // its range they would overflow it in the middle of a request.
            (
                "--header-read-timeout",
                self.header_read_timeout as usize,
                86_400,
            ),
            (
                "--body-read-timeout",
                self.body_read_timeout as usize,
                86_400,
            ),
            ("--sse-keep-alive", self.sse_keep_alive as usize, 86_400),
            ("--stall-timeout", self.stall_timeout as usize, 86_400),
            ("--cache-ttl", self.cache_ttl as usize, 2_678_400),
        ] {
            if value > most {
                return Err(format!("{flag} ({value}) must be at most {most}"));
            }
        }
        Ok(())
    }
}

/// Which model to run, shared by `generate` and `serve`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A GGUF file path, a model name from the manifest, or HF_REPO:FILE (pulled if missing).
    /// Defaults to the default model.
    #[arg(long, short = 'm', env = "EDGEINFER_MODEL")]
    pub model: Option<String>,

    /// Where models are stored when --model is a name.
    #[arg(long, env = "EDGEINFER_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,

    /// A tokenizer.json that replaces the vocabulary in the GGUF file (for files whose
    /// embedded tokenizer is wrong or unsupported).
    #[arg(long, env = "EDGEINFER_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// A Jinja chat template that replaces the model file's (a fixed or newer template).
    #[arg(long, env = "EDGEINFER_CHAT_TEMPLATE_FILE")]
    pub chat_template_file: Option<PathBuf>,

    /// Where the model runs: `cpu`, or `cuda` / `cuda:N` (GPU N; a build with the `cuda`
    /// feature, see scripts/build_cuda.sh). On CUDA, weights and the KV cache live in GPU
    /// memory and --kv-cache-tokens sizes the cache there.
    #[arg(long, env = "EDGEINFER_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceChoice,
}

/// A `--device` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A LoRA adapter to serve (`--lora NAME=PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraArg {
    pub name: String,
    pub path: PathBuf,
}

fn parse_lora(s: &str) -> Result<LoraArg, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.trim().is_empty() && !path.is_empty() => Ok(LoraArg {
            name: name.trim().to_string(),
            path: PathBuf::from(path),
        }),
        _ => Err(format!(
            "`{s}` is not NAME=PATH (the adapter's model name, then its GGUF file)"
        )),
    }
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    match s {
        "cpu" => Ok(DeviceChoice::Cpu),
        "cuda" => Ok(DeviceChoice::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Model name from the manifest, or HF_REPO[@REVISION]:FILE.
    pub spec: Option<String>,

    /// Where models are stored. Downloads go to FILE.part and are renamed when verified.
    #[arg(long, env = "EDGEINFER_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// The prompt: a user message put through the chat template, or raw text with --raw.
    #[arg(long, short = 'p')]
    pub prompt: String,

    #[command(flatten)]
    pub source: ModelArgs,

    /// Tokenize the prompt as is: no chat template, no BOS unless the model asks for one;
    /// special-token text such as <|im_start|> becomes that token.
    #[arg(long)]
    pub raw: bool,

    /// A system message placed before the prompt (chat mode only). Without it the model's
    /// template decides (SmolLM2's adds its own default system prompt).
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate. Generation also stops at an end-of-turn token or a stop string.
    #[arg(long, short = 'n', default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: u64,

    /// Sampling temperature; 0 is greedy (deterministic), higher is more varied.
    #[arg(long, short = 't', default_value_t = 0.0)]
    pub temperature: f32,

    /// Keep only the K most likely tokens before sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,

    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Drop tokens less likely than this fraction of the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,

    /// Penalise tokens seen in the last 64 (1 = off; 1.1 is a common mild value).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,

    /// Subtract this times a token's count so far from its logit (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,

    /// Subtract this from the logit of every token seen so far (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,

    /// Random seed: the same seed and settings give the same output.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop when this text appears (not included in the output). Repeatable.
    #[arg(long)]
    pub stop: Vec<String>,

    /// Print one JSON object (prompt and generated token ids, text, finish reason, timings)
    /// as the last line of stdout.
    #[arg(long)]
    pub json: bool,
}
