//! The key store's commands and the store's location (`keys`, `usage`, and `serve --db`).

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Where the key store and ledger live.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Directory for the server's state (the key and ledger database).
    #[arg(long, env = "EDGEINFER_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// The SQLite database of keys and the request ledger (WAL mode). Default:
    /// DATA_DIR/edgeinfer.db.
    #[arg(long, env = "EDGEINFER_DB")]
    pub db: Option<PathBuf>,
}

impl StoreArgs {
    pub fn db_path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| self.data_dir.join("edgeinfer.db"))
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (it is shown only once; the store keeps its hash).
    Generate(KeyFields),
    /// List the live keys (never the keys themselves: their tokens, aliases and limits).
    List(StoreOnly),
    /// Show one key's settings and spend.
    Info(KeyName),
    /// Change a key's settings.
    Update(KeyUpdate),
    /// Revoke keys (effective on a running server's next request).
    Delete(KeyNames),
}

#[derive(Debug, Args)]
pub struct StoreOnly {
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct KeyName {
    /// The key, its token (sha256) or its alias.
    pub key: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct KeyNames {
    /// Keys, tokens or aliases.
    #[arg(required = true)]
    pub keys: Vec<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct KeyUpdate {
    /// The key, its token (sha256) or its alias.
    pub key: String,
    #[command(flatten)]
    pub fields: KeyFields,
}

/// A key's settings, as the admin routes name them.
#[derive(Debug, Args)]
pub struct KeyFields {
    #[arg(long)]
    pub alias: Option<String>,
    /// Models the key may use, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Tokens per minute (prompt plus completion, reserved at admission).
    #[arg(long)]
    pub tpm_limit: Option<u64>,
    /// Requests per minute.
    #[arg(long)]
    pub rpm_limit: Option<u64>,
    /// Budget in USD per --budget-duration (or for the key's life).
    #[arg(long)]
    pub max_budget: Option<f64>,
    /// Budget period: 30s, 30m, 24h, 30d.
    #[arg(long)]
    pub budget_duration: Option<String>,
    #[arg(long)]
    pub max_parallel_requests: Option<u64>,
    /// Its share of a contended batch relative to other keys' (1 to 100; default 1).
    #[arg(long)]
    pub weight: Option<u64>,
    /// The key expires after this long: 30s, 30m, 24h, 30d.
    #[arg(long)]
    pub duration: Option<String>,
    /// A JSON object kept with the key.
    #[arg(long)]
    pub metadata: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this key (the key, its token or its alias).
    #[arg(long)]
    pub key: Option<String>,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long, value_parser = day)]
    pub start_date: Option<String>,
    /// Last day, YYYY-MM-DD (UTC).
    #[arg(long, value_parser = day)]
    pub end_date: Option<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A day for the usage report's bounds, as the HTTP route takes it.
fn day(v: &str) -> Result<String, String> {
    match crate::gateway::usage::is_day(v) {
        true => Ok(v.to_string()),
        false => Err("a calendar date written YYYY-MM-DD".into()),
    }
}
