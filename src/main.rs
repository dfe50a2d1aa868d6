//! The `edgeinfer` binary: parse the command line, set up logging and threads, run a
//! subcommand. Errors are printed as one clear message with a non-zero exit, never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use edgeinfer::backend::Backend;
use edgeinfer::config::{Cli, Command, DeviceChoice, GenerateArgs, PullArgs, ServeArgs};

mod admin_cli;
mod check_cli;
mod synth_cli;
use edgeinfer::engine::core::{self, EngineConfig};
use edgeinfer::engine::generate::{generate, GenerateParams};
use edgeinfer::engine::sampler::SamplingParams;
use edgeinfer::hub::{self, Manifest};
use edgeinfer::model::{LoadedModel, Message, Pooling};

/// mimalloc instead of glibc's allocator: a forward pass allocates a few kilobytes per op,
/// which in glibc triggers fastbin consolidation on nearly every large request (measured: 3%
/// of a decode step's samples in malloc, free and consolidation). TEI makes the same choice.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Generate(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("EDGEINFER_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    set_threads(cli.threads);
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// candle reads its thread count from the environment; set it before the first tensor op.
/// With RAYON_NUM_THREADS unset, candle re-reads /proc/cpuinfo on every f32 matmul.
fn set_threads(threads: usize) {
    let n = if threads > 0 {
        threads
    } else {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    };
    // Safe: called once at start-up, before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
}

/// Lowers the calling thread's scheduling priority (Linux: nice is per thread; elsewhere
/// nothing). Contended CPU goes to the other threads first; alone it runs at full speed.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // Safe: setpriority only reads its integer arguments; 0 names the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 5);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pull(args) => pull(args),
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(*args),
        Command::Keys(cmd) => admin_cli::keys(cmd),
        Command::Usage(args) => admin_cli::usage(args),
        Command::Synth(args) => synth_cli::run(args),
        Command::BackendCheck(args) => check_cli::run(args),
        Command::Models => {
            let m = Manifest::builtin();
            for e in &m.models {
                let mark = if e.name == m.default {
                    " (default)"
                } else {
                    ""
                };
                println!("{}{mark}\t{}\t{}", e.name, e.file, e.description);
            }
            Ok(())
        }
    }
}

fn pull(args: PullArgs) -> Result<()> {
    let manifest = Manifest::builtin();
    let spec = args.spec.unwrap_or_else(|| manifest.default.clone());
    let entry = manifest.resolve(&spec)?;
    let path = hub::pull(&entry, &args.models_dir)?;
    println!("{}", path.display());
    Ok(())
}

/// A path to an existing file, or a manifest name / HF spec pulled into `models_dir`.
fn resolve_model(model: Option<&str>, models_dir: &Path) -> Result<PathBuf> {
    let manifest = Manifest::builtin();
    let spec = match model {
        Some(m) if Path::new(m).is_file() => return Ok(PathBuf::from(m)),
        Some(m) if m.ends_with(".gguf") && !m.contains(':') => {
            anyhow::bail!("model file {m} does not exist (to download a model, pass its name or HF_REPO:FILE)")
        }
        Some(m) => m.to_string(),
        None => manifest.default.clone(),
    };
    let entry = manifest.resolve(&spec)?;
    let local = hub::local_path(&entry, models_dir);
    if !local.is_file() {
        return Ok(hub::pull(&entry, models_dir)?);
    }
    // A file already there is checked against the manifest's sha256 (memoised, so once): a
    // corrupt model is refused, never served, and nothing is fetched behind the user's back.
    if let Some(expected) = &entry.sha256 {
        let actual = hub::sha256_file_memo(&local)?;
        if &actual != expected {
            anyhow::bail!(
                "{} is not the file the manifest names (sha256 {actual}, expected {expected}): run `edgeinfer pull {}` to fetch it again, or pass the file's path to use it as it is",
                local.display(),
                entry.name
            );
        }
    }
    Ok(local)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    // Bad flags are reported before minutes of model loading or downloading.
    sampling.validate()?;
    let path = resolve_model(args.source.model.as_deref(), &args.source.models_dir)?;
    let tokenizer = args.source.tokenizer.as_deref();
    let template_file = args.source.chat_template_file.as_deref();
    match args.source.device {
        DeviceChoice::Cpu => {
            let mut model = LoadedModel::load(&path, tokenizer, &candle_core::Device::Cpu)
                .with_context(|| format!("cannot load model {}", path.display()))?;
            model.template = replace_template(model.template, template_file)?;
            generate_on(&model, &args, sampling)
        }
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            let mut model = load_cuda(&path, tokenizer, n)?;
            model.template = replace_template(model.template, template_file)?;
            generate_on(&model, &args, sampling)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => Err(no_cuda()),
    }
}

/// `template`, or the one in `file` (`--chat-template-file`) with the same special tokens.
fn replace_template(
    template: edgeinfer::model::ChatTemplate,
    file: Option<&Path>,
) -> Result<edgeinfer::model::ChatTemplate> {
    let Some(file) = file else {
        return Ok(template);
    };
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the chat template {}", file.display()))?;
    template
        .with_source(&source)
        .with_context(|| format!("the chat template {}", file.display()))
}

/// Loads `path` onto GPU `n`; the tensors are read on the host and uploaded.
#[cfg(feature = "cuda")]
fn load_cuda(
    path: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    n: usize,
) -> Result<LoadedModel<edgeinfer::backend::cuda::Cuda>> {
    let backend = edgeinfer::backend::cuda::Cuda::new(n)
        .with_context(|| format!("cannot open CUDA device {n}"))?;
    LoadedModel::load_on(path, tokenizer, &candle_core::Device::Cpu, backend)
        .with_context(|| format!("cannot load model {} onto cuda:{n}", path.display()))
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> anyhow::Error {
    anyhow::anyhow!(
        "this build has no CUDA backend: build it with `cargo build --release --features cuda` \
         (scripts/build_cuda.sh sets up the toolkit)"
    )
}

fn generate_on<B: Backend>(
    model: &LoadedModel<B>,
    args: &GenerateArgs,
    sampling: SamplingParams,
) -> Result<()> {
    let prompt_ids = if args.raw {
        model.tokenizer.encode(&args.prompt, true)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        let text = model.render_chat(&messages)?;
        // The template writes BOS itself where the model wants one.
        model.tokenizer.encode(&text, false)?
    };
    let params = GenerateParams {
        max_tokens: usize::try_from(args.max_tokens).unwrap_or(usize::MAX),
        sampling,
        stop: args.stop.clone(),
    };
    let mut stdout = std::io::stdout().lock();
    let out = generate(model, &prompt_ids, &params, |piece| {
        // A closed pipe (e.g. `| head`) is not an error worth a panic.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let t = &out.timings;
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s | finish: {:?}",
        out.prompt_tokens.len(),
        t.prompt_tokens_per_second,
        out.tokens.len(),
        t.generation_tokens_per_second,
        out.finish_reason,
    );
    if args.json {
        let _ = writeln!(stdout, "{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    // The model's compute threads yield to the HTTP threads: under a full load a 429, a
    // health probe or a scrape is answered at once instead of after a time slice.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| lower_thread_priority())
        .build_global();
    edgeinfer::kernels::pool::set_thread_start(lower_thread_priority);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The model thread does the heavy work; the HTTP side needs little.
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve_async(args));
    // A model download still running in a blocking task must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

async fn serve_async(args: ServeArgs) -> Result<()> {
    use std::sync::Arc;

    use edgeinfer::api::{self, AppState, HttpConfig, Ready};

    use edgeinfer::gateway::price::PriceTable;
    use edgeinfer::gateway::{Gateway, GatewayConfig};
    use edgeinfer::structured::reasoning::{Reasoner, ThinkSyntax};
    use edgeinfer::structured::{Grammars, ToolFormat};

    let manifest = Manifest::builtin();
    let name = match (&args.served_model_name, &args.source.model) {
        (Some(n), _) => n.clone(),
        (None, Some(m)) if Path::new(m).is_file() => Path::new(m)
            .file_stem()
            .map_or_else(|| m.clone(), |s| s.to_string_lossy().into_owned()),
        (None, Some(m)) => m.clone(),
        (None, None) => manifest.default.clone(),
    };
    let prices = match &args.prices {
        Some(p) => PriceTable::load(p)?,
        None => PriceTable::default(),
    };
    let db_path = args.store.db_path();
    let gateway = Gateway::open(GatewayConfig {
        db_path: db_path.clone(),
        master_key: args.master_key.clone(),
        prices,
        global_tpm: args.tpm_limit,
        global_rpm: args.rpm_limit,
        responses_retention: (args.responses_retention_days > 0).then(|| {
            std::time::Duration::from_secs(args.responses_retention_days.saturating_mul(86_400))
        }),
        ledger_retention_days: (args.ledger_retention_days > 0)
            .then_some(args.ledger_retention_days),
    })?;
    if !gateway.auth_required() && !args.insecure_no_auth && !admin_cli::is_loopback(&args.host) {
        anyhow::bail!(
            "refusing to serve {} without API keys: anyone who can reach it could use it. Set --master-key (EDGEINFER_MASTER_KEY) or create keys with `edgeinfer keys generate`, bind 127.0.0.1, or pass --insecure-no-auth",
            args.host
        );
    }
    tracing::info!(db = %db_path.display(), auth = gateway.auth_required(), "key and ledger store open");
    let adapters = adapter_names(&args, &name)?;
    let metrics = api::install_metrics(
        &name,
        edgeinfer::telemetry::CacheShape {
            block_size: args.block_size,
            num_blocks: args.kv_cache_tokens.div_ceil(args.block_size),
            prefix_caching: !args.no_prefix_cache,
        },
        &adapters,
    )?;
    let http = HttpConfig {
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: std::time::Duration::from_secs(args.body_read_timeout),
        sse_keep_alive: std::time::Duration::from_secs(args.sse_keep_alive),
        cache_max_bytes: args.cache_max_bytes,
        idempotency_max_bytes: args.idempotency_max_bytes,
        default_cache_ttl: (args.cache_ttl > 0)
            .then(|| std::time::Duration::from_secs(args.cache_ttl)),
        default_request_timeout: (args.request_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(args.request_timeout_ms)),
        model_aliases: args.model_alias.clone(),
        adapters: adapters.clone(),
        stall_timeout: std::time::Duration::from_secs(args.stall_timeout),
        node_name: args.node_name.clone().unwrap_or_else(host_name),
        metrics_key: args.metrics_key.clone().filter(|k| !k.is_empty()),
        loopback: admin_cli::is_loopback(&args.host),
        cors_origins: args.cors_allow_origin.clone(),
        batch: api::BatchSettings {
            concurrency: (args.max_batch_size / 2).max(1),
            file_storage_per_key: (args.file_storage_per_key > 0)
                .then_some(args.file_storage_per_key),
        },
    };
    let state = Arc::new(AppState::new(name, metrics, Arc::new(gateway), http));
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot bind {}:{}", args.host, args.port))?;
    // Load in the background: /ready and the API answer 503 until the model is ready.
    let loader_state = state.clone();
    let engine_config = EngineConfig {
        max_batch_size: args.max_batch_size,
        max_batch_tokens: args.max_batch_tokens,
        kv_cache_tokens: args.kv_cache_tokens,
        block_size: args.block_size,
        max_queue: args.max_queue,
        prefix_cache: !args.no_prefix_cache,
        background_chunk_tokens: args
            .background_chunk_tokens
            .unwrap_or(match args.source.device {
                DeviceChoice::Cpu => 64,
                DeviceChoice::Cuda(_) => 0,
            }),
        speculate: args.speculate.unwrap_or(match args.source.device {
            DeviceChoice::Cpu => 4,
            DeviceChoice::Cuda(_) => 0,
        }),
    };
    let model_arg = args.source.model.clone();
    let models_dir = args.source.models_dir.clone();
    let tokenizer = args.source.tokenizer.clone();
    let template_file = args.source.chat_template_file.clone();
    let device = args.source.device;
    let pooling_flag = args.pooling;
    let loras = args.lora.clone();
    let split_reasoning_flag = args.reasoning_format == "auto";
    let loader = tokio::task::spawn_blocking(move || -> Result<()> {
        let path = resolve_model(model_arg.as_deref(), &models_dir)?;
        let loaded = match device {
            DeviceChoice::Cpu => {
                let mut model =
                    LoadedModel::load(&path, tokenizer.as_deref(), &candle_core::Device::Cpu)
                        .with_context(|| format!("cannot load model {}", path.display()))?;
                for a in &loras {
                    let index = model
                        .llama
                        .add_adapter(&a.path)
                        .with_context(|| format!("cannot load --lora {}", a.name))?;
                    tracing::info!(name = %a.name, path = %a.path.display(), index, "LoRA adapter loaded");
                }
                start_engine(model, engine_config, &path)?
            }
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(n) => start_engine(
                load_cuda(&path, tokenizer.as_deref(), n)?,
                engine_config,
                &path,
            )?,
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(_) => return Err(no_cuda()),
        };
        let Started {
            engine,
            tokenizer,
            template,
            context_length,
            vocab_size,
            embedding_length,
            pooling,
        } = loaded;
        let tokenizer = Arc::new(tokenizer);
        let template = Arc::new(replace_template(template, template_file.as_deref())?);
        let grammars = Grammars::new(tokenizer.clone(), vocab_size)
            .map_err(|e| anyhow::anyhow!("cannot load model {}: {e}", path.display()))?;
        let (tool_format, native_tools) = ToolFormat::for_template(template.source());
        // A format opened by a control token the vocabulary lacks: the generic rendering.
        let control = |t: &str| {
            tokenizer
                .token_id(t)
                .filter(|&id| tokenizer.is_control(id) && (id as usize) < vocab_size)
        };
        let (tool_format, native_tools) = tool_format
            .resolve(control)
            .map_or((ToolFormat::HERMES, false), |f| (f, native_tools));
        let reasoner = ThinkSyntax::detect(template.source(), |t| tokenizer.token_id(t).is_some())
            .map(|s| Reasoner::new(s, control));
        if let Some(r) = &reasoner {
            tracing::info!(
                open = r.syntax.open,
                close = r.syntax.close,
                "a reasoning model"
            );
        }
        // Response-cache keys name the exact weights and template.
        let mut model_hash = hub::sha256_file_memo(&path)?;
        for a in &loras {
            // And the adapters': a changed adapter file never replays old replies either.
            model_hash = admin_cli::sha256_hex(
                format!("{model_hash} {}", hub::sha256_file_memo(&a.path)?).as_bytes(),
            );
        }
        let template_hash = admin_cli::sha256_hex(template.source().as_bytes());
        let _ = loader_state.ready.set(Ready {
            engine,
            tokenizer,
            template,
            context_length,
            vocab_size,
            embedding_length,
            pooling: pooling_flag.or(pooling).unwrap_or(Pooling::Mean),
            grammars: Arc::new(grammars),
            tool_format,
            native_tools,
            reasoner,
            split_reasoning: split_reasoning_flag,
            model_hash,
            template_hash,
        });
        tracing::info!(path = %path.display(), "model loaded; ready");
        Ok(())
    });
    let server = api::serve(
        state,
        listener,
        std::time::Duration::from_secs(args.shutdown_timeout),
        api::ConnLimits {
            header_read_timeout: std::time::Duration::from_secs(args.header_read_timeout),
            max_connections: args.max_connections,
        },
    );
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        r = loader => {
            r??;
            server.await?;
        }
    }
    Ok(())
}

/// The `--lora` adapters' names, in order: each must differ from the others and from the
/// served model's names, and adapters run on the CPU only.
fn adapter_names(args: &edgeinfer::config::ServeArgs, name: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for a in &args.lora {
        if a.name == name || args.model_alias.contains(&a.name) || names.contains(&a.name) {
            anyhow::bail!(
                "--lora {}: the name `{}` is taken (by the served model, an alias or another adapter)",
                a.name,
                a.name
            );
        }
        names.push(a.name.clone());
    }
    if !names.is_empty() && args.source.device != DeviceChoice::Cpu {
        anyhow::bail!("--lora: LoRA adapters run on the CPU backend only for now (--device cpu)");
    }
    Ok(names)
}

/// A model loaded, warmed up and handed to its engine thread.
struct Started {
    engine: core::EngineHandle,
    tokenizer: edgeinfer::model::Tokenizer,
    template: edgeinfer::model::ChatTemplate,
    context_length: usize,
    vocab_size: usize,
    embedding_length: usize,
    /// The pooling the model file declares, if any.
    pooling: Option<edgeinfer::model::Pooling>,
}

fn start_engine<B: Backend>(
    model: LoadedModel<B>,
    config: EngineConfig,
    path: &Path,
) -> Result<Started> {
    let c = &model.llama.config;
    let (context_length, vocab_size, embedding_length, pooling) =
        (c.context_length, c.vocab_size, c.dim, c.pooling);
    warm_up(&model.llama).with_context(|| format!("cannot run model {}", path.display()))?;
    let runner = edgeinfer::model::LlamaRunner::new(model.llama);
    let engine = core::start(runner, model.tokenizer.clone(), config)
        .with_context(|| format!("cannot allocate the KV cache for {}", path.display()))?;
    Ok(Started {
        engine,
        tokenizer: model.tokenizer,
        template: model.template,
        context_length,
        vocab_size,
        embedding_length,
        pooling,
    })
}

/// One short prefill and one decode step before the node says it is ready: the first pass
/// touches every weight page and starts the compute pool, so the first client does not pay.
fn warm_up<B: Backend>(llama: &edgeinfer::model::Llama<B>) -> Result<()> {
    let started = std::time::Instant::now();
    let mut cache = llama.new_cache();
    llama.forward(&[0; 8], &mut cache)?;
    llama.forward(&[0], &mut cache)?;
    tracing::info!(
        backend = %llama.backend().name(),
        seconds = started.elapsed().as_secs_f64(),
        "warmed up (one prefill, one decode step)"
    );
    Ok(())
}

/// The host name (Linux), or "edgeinfer" where it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "edgeinfer".to_string())
}
