//! The engine loop against a fake model through the `ModelRunner` seam: no weights, so these
//! run in milliseconds and can drive what a real model makes slow (chunked prefill under a
//! small token budget, preemption in a small KV pool, prefix-cache reuse, failures).
//!
//! The fake's next token is a hash of every token its KV store holds for the sequence, read
//! back through the block table the engine hands it. A wrong block table, a bad
//! copy-on-write, a stale prefix-cache block or a lost preemption all change the output,
//! which the tests compare with the same hash worked out from the request alone.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use edgeinfer::engine::core::{self, EngineConfig, EngineHandle};
use edgeinfer::engine::request::{
    EndReport, Ending, Event, FinishReason, GenerationRequest, LogprobInfo, Pooling, UsageSink,
};
use edgeinfer::engine::sampler::SamplingParams;
use edgeinfer::error::ModelError;
use edgeinfer::model::runner::StepLogits;
use edgeinfer::model::{GgufFile, Logits, ModelRunner, SeqInput, Tokenizer};

const CONTEXT: usize = 4096;

/// Word tokens the fake chooses from (they decode to plain text).
fn script(tok: &Tokenizer) -> Vec<u32> {
    tok.encode(
        " one two three four five six seven eight nine ten red green blue sea sky",
        false,
    )
    .unwrap()
}

fn hash(history: &[u32]) -> u64 {
    history.iter().fold(0xcbf29ce484222325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100000001b3)
    })
}

fn next_token(history: &[u32], script: &[u32]) -> u32 {
    script[(hash(history) % script.len() as u64) as usize]
}

/// Values in the fake's hidden states.
const DIM: usize = 4;

/// The fake's final hidden state at the last position of `history`: its hash's bytes.
fn hidden_state(history: &[u32]) -> [f32; DIM] {
    let h = hash(history);
    std::array::from_fn(|i| ((h >> (8 * i)) & 0xff) as f32 - 127.5)
}

#[derive(Default)]
struct Log {
    /// Tokens per forward call.
    calls: Vec<usize>,
    /// Each chunk: its sequence's first token, where it starts, what it asked for.
    chunks: Vec<(u32, usize, Logits)>,
}

struct FakeModel {
    vocab: usize,
    script: Vec<u32>,
    block_size: usize,
    /// (block, row) -> token whose "keys and values" are there.
    kv: HashMap<(u32, usize), u32>,
    log: Arc<Mutex<Log>>,
    /// The forward call (0-based) that fails, if any.
    fail_call: Option<usize>,
    /// Forward calls wait until this opens (a test queues its requests first).
    gate: Gate,
}

/// A latch that the fake model's forward calls from `from` on wait for until it opens.
#[derive(Clone)]
struct Gate {
    latch: Arc<(Mutex<bool>, Condvar)>,
    from: usize,
}

impl Gate {
    fn new(open: bool) -> Gate {
        Gate::closed_from(if open { usize::MAX } else { 0 })
    }

    /// Closed for forward call `from` (0-based) and the ones after it.
    fn closed_from(from: usize) -> Gate {
        Gate {
            latch: Arc::new((Mutex::new(false), Condvar::new())),
            from,
        }
    }

    fn open(&self) {
        *self.latch.0.lock().unwrap() = true;
        self.latch.1.notify_all();
    }

    fn wait(&self, call: usize) {
        if call < self.from {
            return;
        }
        let (lock, cvar) = &*self.latch;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cvar.wait(open).unwrap();
        }
    }
}

impl ModelRunner for FakeModel {
    fn context_length(&self) -> usize {
        CONTEXT
    }

    fn embedding_length(&self) -> usize {
        DIM
    }

    fn allocate_kv(&mut self, block_size: usize, _n_blocks: usize) -> Result<(), ModelError> {
        self.block_size = block_size;
        Ok(())
    }

    fn copy_kv(&mut self, src: u32, dst: u32, rows: usize) -> Result<(), ModelError> {
        for r in 0..rows {
            match self.kv.get(&(src, r)).copied() {
                Some(t) => self.kv.insert((dst, r), t),
                None => self.kv.remove(&(dst, r)),
            };
        }
        Ok(())
    }

    fn forward(&mut self, seqs: &[SeqInput]) -> Result<StepLogits, ModelError> {
        let call = {
            let mut log = self.log.lock().unwrap();
            log.calls.push(seqs.iter().map(|s| s.tokens.len()).sum());
            log.calls.len() - 1
        };
        self.gate.wait(call);
        if self.fail_call == Some(call) {
            return Err(ModelError::Tokenizer("injected failure".into()));
        }
        let bs = self.block_size;
        let mut out = Vec::new();
        for s in seqs {
            assert!(
                s.blocks.len() * bs >= s.start + s.tokens.len(),
                "short block table"
            );
            for (i, &t) in s.tokens.iter().enumerate() {
                let p = s.start + i;
                self.kv.insert((s.blocks[p / bs], p % bs), t);
            }
            let first = self.kv[&(s.blocks[0], 0)];
            let chunk = (first, s.start, s.logits);
            self.log.lock().unwrap().chunks.push(chunk);
            // The positions whose next token is asked for.
            let end = s.start + s.tokens.len();
            let rows = match s.logits {
                Logits::Skip => {
                    out.push(None);
                    continue;
                }
                Logits::Last => end - 1..end,
                Logits::All => s.start..end,
                Logits::Hidden { from, to } => s.start + from..s.start + to,
            };
            let mut logits = vec![0.0f32; self.vocab * rows.len()];
            let mut hidden = Vec::new();
            for (r, p) in rows.enumerate() {
                // Everything the sequence attends to, read back through its block table.
                let history: Vec<u32> = (0..=p)
                    .map(|p| {
                        self.kv
                            .get(&(s.blocks[p / bs], p % bs))
                            .copied()
                            .unwrap_or(u32::MAX)
                    })
                    .collect();
                logits[r * self.vocab + next_token(&history, &self.script) as usize] = 10.0;
                hidden.extend(hidden_state(&history));
            }
            out.push(Some(if matches!(s.logits, Logits::Hidden { .. }) {
                hidden
            } else {
                logits
            }));
        }
        Ok(out)
    }
}

fn tokenizer() -> Tokenizer {
    let f = GgufFile::open(&common::default_model_path()).unwrap();
    Tokenizer::from_gguf(&f).unwrap()
}

fn start(
    config: EngineConfig,
    fail_call: Option<usize>,
    gate: Gate,
) -> (EngineHandle, Arc<Mutex<Log>>, Vec<u32>) {
    let tok = tokenizer();
    let log = Arc::new(Mutex::new(Log::default()));
    let script = script(&tok);
    let fake = FakeModel {
        vocab: tok.vocab_size(),
        script: script.clone(),
        block_size: 0,
        kv: HashMap::new(),
        log: log.clone(),
        fail_call,
        gate,
    };
    (core::start(fake, tok, config).unwrap(), log, script)
}

fn config(max_batch_tokens: usize, kv_cache_tokens: usize) -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_batch_tokens,
        kv_cache_tokens,
        block_size: 16,
        max_queue: 64,
        prefix_cache: true,
        speculate: 0,
        background_chunk_tokens: 0,
    }
}

type Ended = Arc<Mutex<Option<EndReport>>>;

fn request(prompt: Vec<u32>, max_tokens: usize) -> (GenerationRequest, Ended) {
    let ended: Ended = Arc::default();
    let sink = ended.clone();
    let req = GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: Vec::new(),
        stops_end: None,
        top_logprobs: 0,
        logprobs: false,
        prompt_logprobs: None,
        request_id: "test".into(),
        received: Instant::now(),
        cache_prompt: true,
        constraint: None,
        on_end: Some(UsageSink::new(move |r| *sink.lock().unwrap() = Some(r))),
        tenant: 0.into(),
        prediction: Vec::new(),
        embed: None,
        shown_tokens: Vec::new(),
        lines: Default::default(),
        adapter: None,
    };
    (req, ended)
}

/// What the fake must generate for `prompt`: the same hash over the growing history.
fn expected(prompt: &[u32], n: usize, script: &[u32]) -> Vec<u32> {
    let mut history = prompt.to_vec();
    for _ in 0..n {
        let t = next_token(&history, script);
        history.push(t);
    }
    history[prompt.len()..].to_vec()
}

/// A prompt of `len` tokens: a shared head of `shared` tokens, then `tag`'s own.
fn prompt(script: &[u32], shared: usize, len: usize, tag: u32) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let salt = if i < shared { 0 } else { tag as usize + 1 };
            script[(i * 7 + salt * 3 + i / 5) % script.len()]
        })
        .collect()
}

fn collect(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> (String, Option<Event>) {
    let (text, end, _) = collect_scored(rx);
    (text, end)
}

/// The text, the ending, and each prompt-scores event with the tokens that came before it.
type Scored = Vec<(usize, Vec<LogprobInfo>)>;

fn collect_scored(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> (String, Option<Event>, Scored) {
    let (mut text, mut tokens, mut scored) = (String::new(), 0, Vec::new());
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { text: t, .. } => {
                text.push_str(&t);
                tokens += 1;
            }
            Event::Prompt { logprobs, .. } => scored.push((tokens, logprobs)),
            end => return (text, Some(end), scored),
        }
    }
    (text, None, scored)
}

/// The fake's logprob of each prompt token given the ones before: its logits put 10 on the
/// token it predicts and 0 elsewhere.
fn fake_prompt_logprobs(prompt: &[u32], script: &[u32], vocab: usize) -> Vec<f32> {
    let log_z = (10f64.exp() + (vocab - 1) as f64).ln();
    (1..prompt.len())
        .map(|p| {
            let hit = next_token(&prompt[..p], script) == prompt[p];
            (if hit { 10.0 - log_z } else { -log_z }) as f32
        })
        .collect()
}

fn wait_idle(engine: &EngineHandle) {
    let t = Instant::now();
    while engine.in_flight() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the engine did not go idle"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn batched_chunked_preempted_and_cached_requests_match_the_reference() {
    // 64 tokens a step forces chunked prefill; 20 blocks of 16 for 12 requests of up to
    // ~150 positions forces preemption and recomputation. The model waits until all twelve
    // are queued: on a fast host the first requests could otherwise finish before the last
    // arrive, and the pool would never run short.
    let gate = Gate::new(false);
    let (engine, log, script) = start(config(64, 320), None, gate.clone());
    let tok = tokenizer();
    let mut jobs = Vec::new();
    for tag in 0..12u32 {
        let mut p = prompt(&script, 48, 60 + (tag as usize * 13) % 50, tag);
        if tag % 3 == 1 {
            // Partly the fake's own predictions, so the scores show which positions hit.
            for i in (20..p.len()).step_by(2) {
                p[i] = next_token(&p[..i], &script);
            }
        }
        let n = 20 + (tag as usize * 7) % 30;
        let (mut req, ended) = request(p.clone(), n);
        // Every third request scores its prompt: preempted or not, each position once.
        req.prompt_logprobs = (tag % 3 == 1).then_some(1);
        let rx = engine.submit(req).expect("room");
        jobs.push((p, n, ended, std::thread::spawn(move || collect_scored(rx))));
    }
    gate.open();
    let results: Vec<_> = jobs
        .into_iter()
        .map(|(p, n, ended, h)| (p, n, ended, h.join().unwrap()))
        .collect();
    wait_idle(&engine);
    let mut cached_total = 0;
    // Positions a run without preemption would compute: each prompt less its cached head,
    // and each output token but the last fed back.
    let mut needed = 0;
    let mut scored_requests = 0;
    for (p, n, ended, (text, end, scored)) in results {
        let want = expected(&p, n, &script);
        assert_eq!(text, tok.decode(&want).unwrap(), "prompt of {}", p.len());
        if let Some((before, lps)) = scored.first() {
            assert_eq!(scored.len(), 1, "one prompt event");
            assert_eq!(
                *before, 0,
                "the prompt's scores come before its first token"
            );
            let got: Vec<f32> = lps.iter().map(|l| l.chosen.logprob).collect();
            let want = fake_prompt_logprobs(&p, &script, tok.vocab_size());
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-3, "position {}: {g} vs {w}", i + 1);
            }
            assert!(want.iter().filter(|&&w| w > -2.0).count() >= 20, "{want:?}");
            scored_requests += 1;
        }
        match end {
            Some(Event::Finished { usage, .. }) => {
                if !scored.is_empty() {
                    assert_eq!(usage.cached_tokens, 0, "scoring reads no cache");
                }
                assert_eq!(usage.prompt_tokens, p.len());
                assert_eq!(usage.completion_tokens, n);
                cached_total += usage.cached_tokens;
                needed += p.len() - usage.cached_tokens + n - 1;
            }
            other => panic!("{other:?}"),
        }
        let report = ended.lock().unwrap().expect("on_end was called");
        assert!(matches!(report.ending, Ending::Finished(_)));
        assert_eq!(report.usage.completion_tokens, n);
    }
    assert_eq!(scored_requests, 4);
    let calls = log.lock().unwrap().calls.clone();
    assert!(calls.iter().all(|&t| t <= 64), "{calls:?}");
    assert!(
        calls.iter().any(|&t| t > 8),
        "prefill was batched: {calls:?}"
    );
    assert!(
        cached_total >= 32,
        "the shared head came from the prefix cache: {cached_total}"
    );
    let computed: usize = calls.iter().sum();
    assert!(
        computed > needed,
        "the small pool made the engine preempt and recompute: {computed} vs {needed}"
    );
}

#[test]
fn a_failed_forward_fails_that_steps_requests_and_the_engine_goes_on() {
    let (engine, _log, script) = start(config(512, 4096), Some(3), Gate::new(true));
    let p = prompt(&script, 0, 30, 1);
    let (req, ended) = request(p.clone(), 40);
    let (text, end) = collect(engine.submit(req).unwrap());
    assert!(
        matches!(end, Some(Event::Failed(ref f)) if f.message.contains("injected failure")),
        "{end:?}"
    );
    wait_idle(&engine);
    let report = ended.lock().unwrap().expect("on_end was called");
    assert_eq!(report.ending, Ending::Failed);
    // Calls 0 (the prefill), 1 and 2 (decodes) each gave a token before call 3 failed.
    assert_eq!(report.usage.completion_tokens, 3);
    assert_eq!(text, tokenizer().decode(&expected(&p, 3, &script)).unwrap());
    // The next request is served normally.
    let (req, _) = request(p.clone(), 5);
    let (text, end) = collect(engine.submit(req).unwrap());
    assert!(matches!(end, Some(Event::Finished { .. })), "{end:?}");
    assert_eq!(text, tokenizer().decode(&expected(&p, 5, &script)).unwrap());
}

#[test]
fn a_client_that_leaves_mid_generation_is_freed_and_metered() {
    // The model waits from its sixth call until the client has left, so the client leaves
    // mid-generation however slowly this thread runs.
    let gate = Gate::closed_from(5);
    let (engine, _log, script) = start(config(512, 4096), None, gate.clone());
    let (req, ended) = request(prompt(&script, 0, 20, 2), 3000);
    let mut rx = engine.submit(req).unwrap();
    for _ in 0..5 {
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    }
    drop(rx);
    gate.open();
    wait_idle(&engine);
    let report = ended.lock().unwrap().expect("on_end was called");
    assert_eq!(report.ending, Ending::Cancelled);
    assert!(report.usage.completion_tokens >= 5 && report.usage.completion_tokens < 3000);
    assert_eq!(report.usage.prompt_tokens, 20);
}

/// The embedding the engine must send for `prompt` with `pooling`: the fake's hidden
/// states over the prompt pooled, of unit length.
fn expected_embedding(prompt: &[u32], pooling: Pooling) -> Vec<f32> {
    let rows: Vec<[f32; DIM]> = (1..=prompt.len())
        .map(|p| hidden_state(&prompt[..p]))
        .collect();
    let v: Vec<f32> = match pooling {
        Pooling::Mean => (0..DIM)
            .map(|i| rows.iter().map(|r| r[i]).sum::<f32>() / rows.len() as f32)
            .collect(),
        Pooling::First => rows[0].to_vec(),
        Pooling::Last => rows[rows.len() - 1].to_vec(),
    };
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

#[test]
fn embeddings_pool_each_position_once_through_chunks_preemption_and_generation() {
    // Steps of 8 tokens and a 160-position KV pool: five 100-token prompts beside two
    // requests generating 100 tokens each cannot all be held, so embeddings (the newest)
    // are preempted mid-prompt and computed again. The model waits until all are queued.
    let gate = Gate::new(false);
    let (engine, log, script) = start(config(8, 160), None, gate.clone());
    let poolings = [
        Pooling::Mean,
        Pooling::Last,
        Pooling::Mean,
        Pooling::First,
        Pooling::Mean,
    ];
    // Each prompt's first token tells its chunks apart in the fake's log.
    let tagged = |len, tag: u32| {
        let mut p = prompt(&script, 0, len, tag);
        p[0] = script[tag as usize];
        p
    };
    let mut gens = Vec::new();
    for tag in [8, 9] {
        let (req, ended) = request(tagged(20, tag), 100);
        gens.push((tag, engine.submit(req).unwrap(), ended));
    }
    let mut embeds = Vec::new();
    for (tag, pooling) in poolings.into_iter().enumerate() {
        let p = tagged(100, tag as u32);
        let (mut req, ended) = request(p.clone(), 0);
        req.embed = Some(pooling);
        embeds.push((p, pooling, engine.submit(req).unwrap(), ended));
    }
    gate.open();
    for (p, pooling, mut rx, ended) in embeds {
        let Some(Event::Embedding(v)) = rx.blocking_recv() else {
            panic!("no embedding first")
        };
        let want = expected_embedding(&p, pooling);
        assert!(
            v.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{pooling:?}: {v:?} != {want:?}"
        );
        let Some(Event::Finished { usage, .. }) = rx.blocking_recv() else {
            panic!("no end after the embedding")
        };
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (100, 0));
        wait_idle(&engine);
        let report = ended.lock().unwrap().expect("on_end was called");
        assert_eq!(report.ending, Ending::Finished(FinishReason::Stop));
        assert_eq!(report.usage.prompt_tokens, 100);
    }
    let tok = tokenizer();
    for (tag, rx, ended) in gens {
        let (text, end) = collect(rx);
        assert!(matches!(end, Some(Event::Finished { .. })), "{end:?}");
        let want = expected(&tagged(20, tag), 100, &script);
        assert_eq!(text, tok.decode(&want).unwrap());
        assert!(ended.lock().unwrap().is_some());
    }
    // A mean-pooled embedding was preempted after pooling rows and computed again: its
    // chunks then ask for no row it already has (a chunk of no new row asks for none).
    let rerun = log
        .lock()
        .unwrap()
        .chunks
        .iter()
        .any(|&(first, _, logits)| {
            [0, 2, 4].map(|t| script[t]).contains(&first)
                && matches!(logits, Logits::Skip | Logits::Hidden { from: 1.., .. })
        });
    assert!(
        rerun,
        "no mean-pooled embedding ran again after a preemption"
    );
}

#[test]
fn a_reply_that_ends_in_a_checked_draft_reports_the_prediction_it_was_metered_for() {
    let config = EngineConfig {
        speculate: 4,
        ..config(512, 4096)
    };
    let (engine, _log, script) = start(config, None, Gate::new(true));
    let p = prompt(&script, 0, 24, 5);
    // The prediction is the reply itself, so every drafted step is checked and kept, and
    // the reply's last token (max_tokens) comes inside such a step.
    for n in [9, 10, 11, 12] {
        let (mut req, ended) = request(p.clone(), n);
        req.prediction = expected(&p, n + 8, &script);
        let (text, end) = collect(engine.submit(req).unwrap());
        assert_eq!(text, tokenizer().decode(&expected(&p, n, &script)).unwrap());
        let Some(Event::Finished { usage, .. }) = end else {
            panic!("{end:?}")
        };
        wait_idle(&engine);
        let report = ended.lock().unwrap().take().expect("on_end was called");
        assert!(usage.accepted_prediction_tokens > 0, "{usage:?}");
        assert_eq!(
            (
                usage.accepted_prediction_tokens,
                usage.rejected_prediction_tokens
            ),
            (
                report.usage.accepted_prediction_tokens,
                report.usage.rejected_prediction_tokens
            ),
            "n {n}: the reply's usage and the metered one"
        );
    }
}
