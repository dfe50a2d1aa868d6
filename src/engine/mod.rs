//! The engine: sequences, scheduling and sampling. Knows tokens and budgets, never HTTP.
mod active;
pub mod blocks;
pub mod chain;
pub mod constraint;
pub mod core;
mod fair;
pub mod generate;
pub mod lines;
pub mod logprobs;
mod pulse;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod step;
pub mod stop;
