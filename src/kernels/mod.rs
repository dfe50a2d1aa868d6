//! Our CPU hot paths, each checked in tests against a plain reference.
//!
//! Knows slices and layouts; never the scheduler or HTTP.

mod aligned;
pub mod attention;
mod attention_wide;
mod attention_x86;
pub mod cpu;
pub mod kpack;
mod kpack_x86;
pub mod kquant;
mod kquant_x86;
pub mod lora;
pub mod norm;
pub mod pool;
pub mod qmatmul;
pub mod qtile;
pub mod quant;
pub mod silu;
pub mod x86;
