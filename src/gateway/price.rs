//! Prices and costs in integer money: prices are kept in picodollars per token, costs in
//! microdollars, so a ledger total is an exact sum. Knows tokens and money; never HTTP.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::GatewayError;

/// Picodollars per token (1 USD per million tokens = 1,000,000 pUSD per token).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    /// Prompt tokens served from the prefix cache.
    pub cached_input: u64,
    pub output: u64,
    /// Every token of a reply replayed from the response cache.
    pub cached_response: u64,
}

/// The tokens one request is charged for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

impl Price {
    /// Cost of a computed request, in microdollars, rounded half up (once, per request).
    pub fn cost(&self, t: Tokens) -> u64 {
        let cached = t.cached.min(t.prompt);
        let picos = (t.prompt - cached) as u128 * self.input as u128
            + cached as u128 * self.cached_input as u128
            + t.completion as u128 * self.output as u128;
        round_micros(picos)
    }

    /// Cost of a reply replayed from the response cache.
    pub fn cached_cost(&self, t: Tokens) -> u64 {
        round_micros((t.prompt + t.completion) as u128 * self.cached_response as u128)
    }

    /// An upper bound of `cost` for a request of `prompt` tokens and at most `completion`.
    pub fn bound(&self, prompt: u64, completion: u64) -> u64 {
        let picos = prompt as u128 * self.input.max(self.cached_input) as u128
            + completion as u128 * self.output as u128;
        picos.div_ceil(1_000_000).min(MAX_MICROS) as u64
    }

    /// `cf-aig-custom-cost: {"per_token_in": USD, "per_token_out": USD}` (AI Gateway's form).
    pub fn from_custom_cost(header: &str) -> Result<Self, GatewayError> {
        let bad = |reason: &str| GatewayError::Invalid {
            field: "cf-aig-custom-cost".into(),
            reason: reason.into(),
        };
        let v: Value = serde_json::from_str(header).map_err(|_| bad("must be a JSON object"))?;
        let per = |name: &str| -> Result<u64, GatewayError> {
            match v.get(name) {
                None => Ok(0),
                // At most 1 USD a token: sums of costs stay far inside the ledger's integers.
                Some(x) => usd_to_picos(x.as_f64().filter(|&x| x <= 1.0), 1e12).ok_or_else(|| {
                    bad(&format!(
                        "`{name}` must be a USD amount from 0 to 1 (a token)"
                    ))
                }),
            }
        };
        if !v.is_object() {
            return Err(bad("must be a JSON object"));
        }
        let (input, output) = (per("per_token_in")?, per("per_token_out")?);
        Ok(Self {
            input,
            cached_input: input,
            output,
            cached_response: 0,
        })
    }
}

/// The most one request may cost: the ledger stores costs as SQLite's signed integers.
const MAX_MICROS: u128 = i64::MAX as u128;

fn round_micros(picos: u128) -> u64 {
    ((picos + 500_000) / 1_000_000).min(MAX_MICROS) as u64
}

fn usd_to_picos(x: Option<f64>, scale: f64) -> Option<u64> {
    x.filter(|x| x.is_finite() && *x >= 0.0 && x * scale < 1.8e19)
        .map(|x| (x * scale).round() as u64)
}

/// Prices per served model, from a JSON file:
/// `{"MODEL or *": {"input": 0.15, "cached_input": 0.075, "output": 0.6, "cached_response": 0}}`
/// in USD per million tokens. A model without an entry uses `*`, else costs nothing.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let bad = |reason: String| GatewayError::Prices {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Self::parse(&text).map_err(bad)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let obj = v.as_object().ok_or("must be an object of models")?;
        let mut models = HashMap::new();
        for (model, p) in obj {
            let p = p
                .as_object()
                .ok_or_else(|| format!("`{model}` must be an object of prices"))?;
            let mut price = Price::default();
            let mut cached_input = None;
            for (field, x) in p {
                let picos = usd_to_picos(x.as_f64(), 1e6).ok_or_else(|| {
                    format!(
                        "`{model}.{field}` must be a non-negative USD amount per million tokens"
                    )
                })?;
                match field.as_str() {
                    "input" => price.input = picos,
                    "cached_input" => cached_input = Some(picos),
                    "output" => price.output = picos,
                    "cached_response" => price.cached_response = picos,
                    _ => return Err(format!("`{model}.{field}`: unknown price (known: input, cached_input, output, cached_response)")),
                }
            }
            price.cached_input = cached_input.unwrap_or(price.input);
            models.insert(model.clone(), price);
        }
        Ok(Self { models })
    }

    pub fn price(&self, model: &str) -> Price {
        self.price_first(&[model])
    }

    /// The price of the first of `models` the table names (a LoRA adapter's own, then its
    /// base model's), else the `*` entry, else nothing.
    pub fn price_first(&self, models: &[&str]) -> Price {
        models
            .iter()
            .find_map(|m| self.models.get(*m))
            .or_else(|| self.models.get("*"))
            .copied()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_integer_and_rounded_once() {
        let t = PriceTable::parse(
            r#"{"m": {"input": 0.15, "cached_input": 0.075, "output": 0.6}, "*": {"output": 1}}"#,
        )
        .unwrap();
        let p = t.price("m");
        assert_eq!(p.input, 150_000);
        // 60 uncached * 0.15 + 40 cached * 0.075 + 10 * 0.6 = 9 + 3 + 6 = 18 micro-USD.
        let tok = Tokens {
            prompt: 100,
            cached: 40,
            completion: 10,
        };
        assert_eq!(p.cost(tok), 18);
        assert!(p.bound(100, 10) >= p.cost(tok));
        assert_eq!(t.price("other").output, 1_000_000);
        assert_eq!(t.price("other").input, 0);
        // An adapter without a price of its own costs what its base model does.
        assert_eq!(t.price_first(&["adapter", "m"]), t.price("m"));
        assert_eq!(t.price_first(&["adapter", "other"]), t.price("*"));
        assert!(PriceTable::parse(r#"{"m": {"inptu": 1}}"#).is_err());
        assert!(PriceTable::parse(r#"{"m": {"input": -1}}"#).is_err());
    }

    #[test]
    fn custom_cost_header() {
        let p = Price::from_custom_cost(r#"{"per_token_in": 0.000001, "per_token_out": 0.000002}"#)
            .unwrap();
        assert_eq!((p.input, p.output), (1_000_000, 2_000_000));
        assert_eq!(
            p.cost(Tokens {
                prompt: 3,
                cached: 0,
                completion: 2
            }),
            7
        );
        assert!(Price::from_custom_cost("[1]").is_err());
        assert!(Price::from_custom_cost(r#"{"per_token_in": "x"}"#).is_err());
        // At most 1 USD a token; costs stay within the ledger's signed integers.
        assert!(Price::from_custom_cost(r#"{"per_token_out": 1}"#).is_ok());
        assert!(Price::from_custom_cost(r#"{"per_token_out": 1.01}"#).is_err());
        let huge = Price {
            input: u64::MAX,
            cached_input: u64::MAX,
            output: u64::MAX,
            cached_response: 0,
        };
        let all = Tokens {
            prompt: 1 << 40,
            cached: 0,
            completion: 1 << 40,
        };
        assert_eq!(huge.cost(all), i64::MAX as u64);
        assert_eq!(huge.bound(1 << 40, 1 << 40), i64::MAX as u64);
    }
}
