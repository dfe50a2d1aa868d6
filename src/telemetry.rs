//! Every metric the node exports, named in one place. Each engine event is recorded twice:
//! as our own `edgeinfer_*` series and under the `vllm:*` names (with a `model_name` label)
//! that inference schedulers scrape (the Gateway API Inference Extension's endpoint picker,
//! llm-d, vLLM's production-stack router), so a node can sit behind them unchanged.
//!
//! [`init`] describes every series and sets it to zero, so scrapers see all of them from
//! start-up, before the model has loaded.

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

static MODEL_NAME: OnceLock<&'static str> = OnceLock::new();

/// The `model_name` label (set once; a label that borrows it costs no allocation).
fn model() -> &'static str {
    MODEL_NAME.get().copied().unwrap_or("")
}

/// The KV cache's shape, for `vllm:cache_config_info`.
#[derive(Debug, Clone, Copy)]
pub struct CacheShape {
    pub block_size: usize,
    pub num_blocks: usize,
    pub prefix_caching: bool,
}

/// Names every series and sets it to zero. Call once, after the recorder is installed.
pub fn init(model_name: &str, cache: CacheShape, adapters: &[String]) {
    let _ = MODEL_NAME.set(Box::leak(model_name.to_string().into_boxed_str()));
    describe();
    let m = model();
    for name in [RUNNING, WAITING, KV_USAGE, PREFIX_BLOCKS] {
        gauge!(name).set(0.0);
    }
    for name in [
        PROMPT,
        GENERATED,
        PREEMPTIONS,
        COMPUTED,
        CACHE_QUERIES,
        CACHE_HITS,
        EVICTIONS,
        DRAFT_OFFERED,
        DRAFT_ACCEPTED,
    ] {
        counter!(name).absolute(0);
    }
    for name in [TTFT, ITL, E2E, QUEUE] {
        let _ = histogram!(name);
    }
    for (ours, theirs) in [
        ("stop", "stop"),
        ("length", "length"),
        ("cancelled", "abort"),
    ] {
        counter!(SUCCESS, "finish_reason" => ours).absolute(0);
        counter!(V_SUCCESS, "model_name" => m, "finished_reason" => theirs).absolute(0);
    }
    for name in [V_RUNNING, V_WAITING, V_KV_USAGE, PS_KV_USAGE, PS_HIT_RATE] {
        gauge!(name, "model_name" => m).set(0.0);
    }
    for name in [
        V_PROMPT,
        V_GENERATED,
        V_PREEMPTIONS,
        V_CACHE_QUERIES,
        V_CACHE_HITS,
        PS_CACHE_QUERIES,
        PS_CACHE_HITS,
    ] {
        counter!(name, "model_name" => m).absolute(0);
    }
    // Histograms exist once touched; an empty one renders as all-zero buckets.
    for name in [V_TTFT, V_ITL, V_E2E, V_QUEUE, PS_TPOT] {
        let _ = histogram!(name, "model_name" => m);
    }
    gauge!("vllm:cache_config_info",
        "model_name" => m,
        "block_size" => cache.block_size.to_string(),
        "num_gpu_blocks" => cache.num_blocks.to_string(),
        "cache_dtype" => "f16",
        "enable_prefix_caching" => if cache.prefix_caching { "True" } else { "False" })
    .set(1.0);
    // The LoRA adapters, all resident (the endpoint picker routes a request for one to a
    // node that runs it, and logs an error without the family).
    gauge!("vllm:lora_requests_info",
        "max_lora" => adapters.len().to_string(),
        "running_lora_adapters" => adapters.join(","), "waiting_lora_adapters" => "")
    .set(0.0);
}

const RUNNING: &str = "edgeinfer_requests_running";
const WAITING: &str = "edgeinfer_requests_waiting";
const KV_USAGE: &str = "edgeinfer_kv_cache_usage_ratio";
const PREFIX_BLOCKS: &str = "edgeinfer_prefix_cache_blocks";
const PROMPT: &str = "edgeinfer_prompt_tokens_total";
const GENERATED: &str = "edgeinfer_generation_tokens_total";
const PREEMPTIONS: &str = "edgeinfer_preemptions_total";
const COMPUTED: &str = "edgeinfer_prompt_tokens_computed_total";
const CACHE_QUERIES: &str = "edgeinfer_prefix_cache_queries_total";
const CACHE_HITS: &str = "edgeinfer_prefix_cache_hits_total";
const EVICTIONS: &str = "edgeinfer_prefix_cache_evictions_total";
const SUCCESS: &str = "edgeinfer_request_success_total";
const DRAFT_OFFERED: &str = "edgeinfer_draft_tokens_total";
const DRAFT_ACCEPTED: &str = "edgeinfer_draft_tokens_accepted_total";
const TTFT: &str = "edgeinfer_time_to_first_token_seconds";
const ITL: &str = "edgeinfer_inter_token_latency_seconds";
const E2E: &str = "edgeinfer_e2e_request_latency_seconds";
const QUEUE: &str = "edgeinfer_request_queue_time_seconds";
const GW_REQUESTS: &str = "edgeinfer_gateway_requests_total";
const GW_TOKENS: &str = "edgeinfer_gateway_tokens_total";
const GW_COST: &str = "edgeinfer_gateway_cost_micros_total";

const V_RUNNING: &str = "vllm:num_requests_running";
const V_WAITING: &str = "vllm:num_requests_waiting";
const V_KV_USAGE: &str = "vllm:kv_cache_usage_perc";
const V_PROMPT: &str = "vllm:prompt_tokens_total";
const V_GENERATED: &str = "vllm:generation_tokens_total";
const V_PREEMPTIONS: &str = "vllm:num_preemptions_total";
const V_CACHE_QUERIES: &str = "vllm:prefix_cache_queries_total";
const V_CACHE_HITS: &str = "vllm:prefix_cache_hits_total";
const V_SUCCESS: &str = "vllm:request_success_total";
const V_TTFT: &str = "vllm:time_to_first_token_seconds";
const V_ITL: &str = "vllm:inter_token_latency_seconds";
const V_E2E: &str = "vllm:e2e_request_latency_seconds";
const V_QUEUE: &str = "vllm:request_queue_time_seconds";
// The older names vLLM's production-stack router reads.
const PS_KV_USAGE: &str = "vllm:gpu_cache_usage_perc";
const PS_CACHE_QUERIES: &str = "vllm:gpu_prefix_cache_queries_total";
const PS_CACHE_HITS: &str = "vllm:gpu_prefix_cache_hits_total";
const PS_HIT_RATE: &str = "vllm:gpu_prefix_cache_hit_rate";
const PS_TPOT: &str = "vllm:time_per_output_token_seconds";

fn describe() {
    describe_gauge!(RUNNING, "Requests in the running batch");
    describe_gauge!(WAITING, "Requests waiting to run");
    describe_counter!(PROMPT, "Prompt tokens admitted");
    describe_counter!(GENERATED, "Tokens generated");
    describe_counter!(PREEMPTIONS, "Requests preempted to free KV blocks");
    describe_counter!(SUCCESS, "Finished requests by finish reason");
    describe_histogram!(TTFT, "Arrival to first token");
    describe_histogram!(ITL, "Time between tokens");
    describe_histogram!(E2E, "Arrival to last token");
    describe_histogram!(QUEUE, "Arrival to first step");
    describe_gauge!(
        KV_USAGE,
        "Share of KV blocks referenced by requests (cached, unreferenced blocks count as free)"
    );
    describe_counter!(
        COMPUTED,
        "Prompt tokens run through the model (prompt tokens minus prefix-cache hits, plus recomputation after preemption)"
    );
    describe_counter!(CACHE_QUERIES, "Prompt tokens looked up in the prefix cache");
    describe_counter!(CACHE_HITS, "Prompt tokens found in the prefix cache");
    describe_gauge!(PREFIX_BLOCKS, "KV blocks registered in the prefix cache");
    describe_counter!(EVICTIONS, "Cached KV blocks evicted to make room");
    describe_counter!(
        DRAFT_OFFERED,
        "Draft tokens verified (speculative decoding by prompt lookup, --speculate)"
    );
    describe_counter!(
        DRAFT_ACCEPTED,
        "Draft tokens kept (equal to the token sampled)"
    );
    describe_counter!(
        GW_REQUESTS,
        "Ledgered requests by key (the first 12 hex digits of its token; `none` without one) and status"
    );
    describe_counter!(
        GW_TOKENS,
        "Ledgered tokens by key and kind (prompt, cached: of the prompt, completion)"
    );
    describe_counter!(GW_COST, "Ledgered cost by key, in micro-dollars");

    describe_gauge!(V_RUNNING, "vLLM name: requests in the running batch");
    describe_gauge!(V_WAITING, "vLLM name: requests waiting to run");
    describe_gauge!(V_KV_USAGE, "vLLM name: KV-cache usage, 0..1");
    describe_counter!(V_PROMPT, "vLLM name: prompt tokens admitted");
    describe_counter!(V_GENERATED, "vLLM name: tokens generated");
    describe_counter!(V_PREEMPTIONS, "vLLM name: preemptions");
    describe_counter!(V_CACHE_QUERIES, "vLLM name: prompt tokens looked up");
    describe_counter!(V_CACHE_HITS, "vLLM name: prompt tokens found");
    describe_counter!(V_SUCCESS, "vLLM name: finished requests by reason");
    describe_histogram!(V_TTFT, "vLLM name: arrival to first token");
    describe_histogram!(V_ITL, "vLLM name: time between tokens");
    describe_histogram!(V_E2E, "vLLM name: arrival to last token");
    describe_histogram!(V_QUEUE, "vLLM name: arrival to first step");
    describe_gauge!(PS_KV_USAGE, "Older vLLM name: KV-cache usage, 0..1");
    describe_histogram!(PS_TPOT, "Older vLLM name: time between tokens");
    describe_counter!(PS_CACHE_QUERIES, "Older vLLM name: prompt tokens looked up");
    describe_counter!(PS_CACHE_HITS, "Older vLLM name: prompt tokens found");
    describe_gauge!(
        PS_HIT_RATE,
        "Older vLLM name: hits over queries since start, 0..1"
    );
    describe_gauge!(
        "vllm:lora_requests_info",
        "vLLM name: the LoRA adapters served (all resident, in `running_lora_adapters`)"
    );
    describe_gauge!(
        "vllm:cache_config_info",
        "vLLM name: the KV cache's configuration, in labels"
    );
}

/// One ledger row, as `/v1/usage` totals it: by key (`key_id` is its token, the sha256 of
/// the key; its first 12 hex digits name it here, as `/key/list` shows it) and status.
pub fn ledgered(key_id: Option<&str>, status: &'static str, tokens: [u64; 3], cost_micros: u64) {
    let key = key_label(key_id);
    counter!(GW_REQUESTS, "key" => key.clone(), "status" => status).increment(1);
    for (kind, n) in ["prompt", "cached", "completion"].into_iter().zip(tokens) {
        counter!(GW_TOKENS, "key" => key.clone(), "kind" => kind).increment(n);
    }
    counter!(GW_COST, "key" => key).increment(cost_micros);
}

/// Keys that get series of their own, at most: past them (many short-lived keys), rows count
/// under `other`, so a scrape stays small and the metrics' memory bounded.
const MAX_KEY_LABELS: usize = 1000;

/// The `key` label of a row of `key_id`: its first 12 hex digits, `none`, or `other` once
/// `MAX_KEY_LABELS` keys have theirs.
fn key_label(key_id: Option<&str>) -> String {
    static LABELLED: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let Some(k) = key_id else {
        return "none".into();
    };
    let label: String = k.chars().take(12).collect();
    let mut labelled = LABELLED.lock().unwrap_or_else(|p| p.into_inner());
    if labelled.contains(&label) || labelled.len() < MAX_KEY_LABELS {
        labelled.insert(label.clone());
        label
    } else {
        "other".into()
    }
}

/// A request got its first step: how long it waited, its prompt, and what the prefix cache
/// had of it (`cache_queried`: whether it looked).
pub fn admitted(waited_s: f64, prompt: usize, cached: usize, cache_queried: bool) {
    let m = model();
    histogram!(QUEUE).record(waited_s);
    histogram!(V_QUEUE, "model_name" => m).record(waited_s);
    counter!(PROMPT).increment(prompt as u64);
    counter!(V_PROMPT, "model_name" => m).increment(prompt as u64);
    if cache_queried {
        counter!(CACHE_QUERIES).increment(prompt as u64);
        counter!(CACHE_HITS).increment(cached as u64);
        counter!(V_CACHE_QUERIES, "model_name" => m).increment(prompt as u64);
        counter!(V_CACHE_HITS, "model_name" => m).increment(cached as u64);
        counter!(PS_CACHE_QUERIES, "model_name" => m).increment(prompt as u64);
        counter!(PS_CACHE_HITS, "model_name" => m).increment(cached as u64);
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        static TOTALS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
        let queried = TOTALS[0].fetch_add(prompt as u64, Relaxed) + prompt as u64;
        let hit = TOTALS[1].fetch_add(cached as u64, Relaxed) + cached as u64;
        if queried > 0 {
            gauge!(PS_HIT_RATE, "model_name" => m).set(hit as f64 / queried as f64);
        }
    }
}

pub fn preempted(n: usize) {
    counter!(PREEMPTIONS).increment(n as u64);
    counter!(V_PREEMPTIONS, "model_name" => model()).increment(n as u64);
}

/// A draft of `offered` tokens was verified and `accepted` of them kept.
pub fn drafted(offered: usize, accepted: usize) {
    counter!(DRAFT_OFFERED).increment(offered as u64);
    counter!(DRAFT_ACCEPTED).increment(accepted as u64);
}

/// Prompt positions run through the model in one step.
pub fn prompt_computed(n: usize) {
    counter!(COMPUTED).increment(n as u64);
}

/// A token was sampled: `first` is the time since arrival for a request's first token,
/// otherwise the time since its previous token.
pub fn token_latency(first: bool, seconds: f64) {
    let (ours, theirs) = if first { (TTFT, V_TTFT) } else { (ITL, V_ITL) };
    histogram!(ours).record(seconds);
    histogram!(theirs, "model_name" => model()).record(seconds);
    if !first {
        histogram!(PS_TPOT, "model_name" => model()).record(seconds);
    }
}

/// A token that counts toward the completion.
pub fn generated() {
    counter!(GENERATED).increment(1);
    counter!(V_GENERATED, "model_name" => model()).increment(1);
}

/// A request ended (`reason`: stop, length, cancelled); `e2e_s` when it ran to its end.
pub fn finished(reason: &'static str, e2e_s: Option<f64>) {
    let m = model();
    counter!(SUCCESS, "finish_reason" => reason).increment(1);
    // vLLM's label is `finished_reason`, and it calls a cancellation "abort".
    let theirs = if reason == "cancelled" {
        "abort"
    } else {
        reason
    };
    counter!(V_SUCCESS, "model_name" => m, "finished_reason" => theirs).increment(1);
    if let Some(s) = e2e_s {
        histogram!(E2E).record(s);
        histogram!(V_E2E, "model_name" => m).record(s);
    }
}

/// The scheduler's state, after every step and when idle.
pub fn gauges(running: usize, waiting: usize, kv_usage: f64, cached_blocks: usize, evictions: u64) {
    let m = model();
    gauge!(RUNNING).set(running as f64);
    gauge!(WAITING).set(waiting as f64);
    gauge!(KV_USAGE).set(kv_usage);
    gauge!(V_RUNNING, "model_name" => m).set(running as f64);
    gauge!(V_WAITING, "model_name" => m).set(waiting as f64);
    gauge!(V_KV_USAGE, "model_name" => m).set(kv_usage);
    gauge!(PS_KV_USAGE, "model_name" => m).set(kv_usage);
    gauge!(PREFIX_BLOCKS).set(cached_blocks as f64);
    counter!(EVICTIONS).absolute(evictions);
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_past_the_most_labelled_count_as_other() {
        let key = |i: usize| format!("{i:012x}ffff");
        let labels: Vec<String> = (0..super::MAX_KEY_LABELS + 5)
            .map(|i| super::key_label(Some(&key(i))))
            .collect();
        assert_eq!(labels[0], format!("{:012x}", 0));
        assert_eq!(labels[super::MAX_KEY_LABELS + 4], "other");
        // A key that has its series keeps it; no key is `none`.
        assert_eq!(super::key_label(Some(&key(3))), format!("{:012x}", 3));
        assert_eq!(super::key_label(None), "none");
    }
}
