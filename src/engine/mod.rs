//! The engine: sequences, scheduling and sampling. Knows tokens and budgets, never HTTP.
pub mod generate;
pub mod sampler;
pub mod stop;
