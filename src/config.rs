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

    /// Tokenize the prompt as is: no chat template, no BOS unless the model asks for one;
    /// special-token text such as <|im_start|> becomes that token.
    #[arg(long)]
    pub raw: bool,

    /// A system message placed before the prompt (chat mode only). Without it the model's
    /// template decides (SmolLM2's adds its own default system prompt).
    #[arg(long)]
    pub system: Option<String>,

    /// Most tokens to generate. Generation also stops at an end-of-turn token or a stop string.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,

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
