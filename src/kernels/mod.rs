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

/// A switch in the environment: set to anything but empty, `0`, `false`, `no` or `off`
/// (`EDGEINFER_NO_SIMD=1` on, `EDGEINFER_NO_SIMD=0` off).
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no" | "off"
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_flags_read_one_and_zero_as_people_write_them() {
        let name = "EDGEINFER_TEST_ENV_FLAG";
        for (value, on) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("false", false),
            ("OFF", false),
            ("", false),
        ] {
            std::env::set_var(name, value);
            assert_eq!(super::env_flag(name), on, "{value:?}");
        }
        std::env::remove_var(name);
        assert!(!super::env_flag(name));
    }
}
