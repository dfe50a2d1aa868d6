//! Batching invariance at the model level: sequences of different lengths, prefilling in
//! chunks and decoding together in one packed forward over a shared block pool, produce the
//! logits each produces alone (bit for bit), and stay within tolerance of candle's
//! `quantized_llama` run per sequence.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::synthetic::{self, Spec};
use edgeinfer::model::llama::argmax;
use edgeinfer::model::{GgufFile, KvPool, Llama, Logits, SeqInput};

const BLOCK: usize = 4;

/// One sequence's forward alone: the logits of its last token.
fn last_logits(
    model: &Llama,
    pool: &mut KvPool,
    tokens: &[u32],
    start: usize,
    blocks: &[u32],
) -> Vec<f32> {
    let input = SeqInput {
        tokens,
        start,
        blocks,
        logits: Logits::Last,
        adapter: None,
    };
    model
        .forward_batch(&[input], pool)
        .unwrap()
        .remove(0)
        .unwrap()
}

struct Seq {
    prompt: Vec<u32>,
    /// Prompt tokens already in the KV cache.
    done: usize,
    generated: Vec<u32>,
    blocks: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

#[test]
fn mixed_batches_equal_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    let mut pool = model.new_pool(BLOCK, 32);
    // Scattered block tables: no sequence's blocks are contiguous or in order.
    let tables = [
        vec![5, 17, 2, 9, 30, 11],
        vec![0, 21, 14, 6],
        vec![25, 3, 19, 8, 28, 1, 12],
    ];
    let prompts = [
        vec![256, 10, 20, 30, 40, 50, 60],
        vec![256, 99, 98],
        (0..14).map(|i| 100 + i).collect::<Vec<u32>>(),
    ];
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .zip(tables)
        .map(|(p, blocks)| Seq {
            prompt: p.clone(),
            done: 0,
            generated: vec![],
            blocks,
            logits: vec![],
        })
        .collect();
    // Step plan: sequence 2 joins at step 2 and prefills in chunks of 5 while 0 and 1 decode.
    for step in 0..7 {
        let mut work: Vec<(usize, Vec<u32>, usize, bool)> = Vec::new(); // (seq, tokens, start, logits)
        for (i, s) in seqs.iter().enumerate() {
            if i == 2 && step < 2 {
                continue;
            }
            if s.done < s.prompt.len() {
                let chunk = if i == 2 { 5 } else { s.prompt.len() };
                let end = (s.done + chunk).min(s.prompt.len());
                work.push((
                    i,
                    s.prompt[s.done..end].to_vec(),
                    s.done,
                    end == s.prompt.len(),
                ));
            } else {
                let pos = s.prompt.len() + s.generated.len() - 1;
                work.push((i, vec![*s.generated.last().unwrap()], pos, true));
            }
        }
        let inputs: Vec<SeqInput> = work
            .iter()
            .map(|(i, tokens, start, logits)| SeqInput {
                tokens,
                start: *start,
                blocks: &seqs[*i].blocks,
                logits: (*logits).into(),
                adapter: None,
            })
            .collect();
        let out = model.forward_batch(&inputs, &mut pool).unwrap();
        for ((i, tokens, _, _), logits) in work.iter().zip(out) {
            let s = &mut seqs[*i];
            if s.done < s.prompt.len() {
                s.done += tokens.len();
            }
            if let Some(l) = logits {
                s.generated.push(argmax(&l));
                s.logits.push(l);
            }
        }
    }
    let oracle = || {
        let mut f = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap()
    };
    for s in &seqs {
        assert!(
            s.logits.len() >= 3,
            "every sequence produced several tokens"
        );
        // Alone, with its own cache: identical logits at every step.
        let mut cache = model.new_cache();
        let mut alone = vec![model.forward(&s.prompt, &mut cache).unwrap()];
        for &t in &s.generated[..s.generated.len() - 1] {
            alone.push(model.forward(&[t], &mut cache).unwrap());
        }
        assert_eq!(
            alone, s.logits,
            "batched logits differ from the sequence alone"
        );
        // And close to candle's quantized_llama on the same tokens.
        let mut m = oracle();
        let x = Tensor::new(s.prompt.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut want: Vec<f32> = m
            .forward(&x, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (step, &t) in s.generated.iter().enumerate() {
            let got = &s.logits[step];
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(diff / scale < 0.06, "step {step}: {}", diff / scale);
            let x = Tensor::new(&[t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            want = m
                .forward(&x, s.prompt.len() + step)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
        }
    }
}

/// Prefix caching shares blocks whose keys and values were written by decode steps (one token
/// at a time) with sequences that would otherwise compute them in a prefill chunk. That is
/// only safe if both paths write the same bits, and if continuing from shared blocks gives
/// the logits of a full computation.
#[test]
fn decoded_kv_equals_prefilled_kv_and_cached_blocks_continue_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    let mut pool = model.new_pool(BLOCK, 12);
    let step = |pool: &mut KvPool, tokens: &[u32], start, blocks: &[u32]| {
        last_logits(&model, pool, tokens, start, blocks)
    };
    // A: prefill 6 prompt tokens, then decode until positions 0..=10 are in the cache.
    let a_blocks = [0u32, 1, 2];
    let mut tokens: Vec<u32> = vec![256, 11, 22, 33, 44, 55];
    let mut logits = step(&mut pool, &tokens, 0, &a_blocks);
    while tokens.len() < 11 {
        tokens.push(argmax(&logits));
        let pos = tokens.len() - 1;
        logits = step(&mut pool, &tokens[pos..], pos, &a_blocks);
    }
    // B: the same 11 tokens in one prefill chunk into other blocks.
    let b_blocks = [3u32, 4, 5];
    let b_logits = step(&mut pool, &tokens, 0, &b_blocks);
    assert_eq!(b_logits, logits, "prefill and decode disagree on logits");
    let row = |blocks: &[u32], p: usize| blocks[p / BLOCK] as usize * BLOCK + p % BLOCK;
    for layer in 0..model.config.n_layer {
        let va = pool.view(layer, &a_blocks);
        let stride = va.stride;
        for p in 0..tokens.len() {
            let (ra, rb) = (row(&a_blocks, p) * stride, row(&b_blocks, p) * stride);
            assert!(
                va.k[ra..ra + stride]
                    .iter()
                    .zip(&va.k[rb..rb + stride])
                    .all(|(x, y)| x.to_bits() == y.to_bits())
                    && va.v[ra..ra + stride]
                        .iter()
                        .zip(&va.v[rb..rb + stride])
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                "layer {layer} position {p}: decoded and prefilled KV differ"
            );
        }
    }
    // C: shares A's two full blocks (positions 0..8) and computes only the rest.
    let c_blocks = [0u32, 1, 6];
    let c_logits = step(&mut pool, &tokens[8..], 8, &c_blocks);
    assert_eq!(
        c_logits, logits,
        "continuing from shared blocks changed the logits"
    );
}

/// `Logits::All` (prompt scoring) gives each position's row as that position would get
/// it as the last token of its own forward, and splits right beside other sequences.
#[test]
fn every_rows_logits_equal_each_prefix_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    let vocab = model.config.vocab_size;
    let mut pool = model.new_pool(BLOCK, 16);
    let a: Vec<u32> = vec![256, 7, 9, 200, 12, 5, 77, 8, 41];
    let b: Vec<u32> = vec![256, 99, 98, 97];
    let out = model
        .forward_batch(
            &[
                SeqInput {
                    tokens: &b,
                    start: 0,
                    blocks: &[0],
                    logits: Logits::Last,
                    adapter: None,
                },
                SeqInput {
                    tokens: &a,
                    start: 0,
                    blocks: &[1, 2, 3],
                    logits: Logits::All,
                    adapter: None,
                },
                SeqInput {
                    tokens: &b[..2],
                    start: 0,
                    blocks: &[4],
                    logits: Logits::Skip,
                    adapter: None,
                },
            ],
            &mut pool,
        )
        .unwrap();
    assert!(out[2].is_none());
    let rows = out[1].as_ref().unwrap();
    assert_eq!(rows.len(), a.len() * vocab);
    let alone =
        |tokens: &[u32], pool: &mut KvPool| last_logits(&model, pool, tokens, 0, &[8, 9, 10]);
    assert_eq!(
        out[0].as_ref().unwrap(),
        &alone(&b, &mut pool),
        "the Last beside it"
    );
    for k in 1..=a.len() {
        let row = &rows[(k - 1) * vocab..k * vocab];
        assert_eq!(row, &alone(&a[..k], &mut pool)[..], "position {}", k - 1);
    }
}

/// Every row's hidden state.
fn every(len: usize) -> Logits {
    Logits::Hidden { from: 0, to: len }
}

/// `Logits::Hidden` (embeddings) gives each position's final hidden state: the rows the lm
/// head reads (projected through the output matrix, they are the logits `Logits::All`
/// gives), split right beside sequences asking for logits, and the same whether the
/// prompt runs in one chunk or two.
#[test]
fn hidden_rows_are_what_the_lm_head_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    let (vocab, dim) = (model.config.vocab_size, model.config.dim);
    let mut pool = model.new_pool(BLOCK, 16);
    let a: Vec<u32> = vec![256, 7, 9, 200, 12, 5, 77, 8, 41];
    let b: Vec<u32> = vec![256, 99, 98, 97];
    let seq = |tokens, start, blocks, logits| SeqInput {
        tokens,
        start,
        blocks,
        logits,
        adapter: None,
    };
    let out = model
        .forward_batch(
            &[
                seq(&b, 0, &[0], Logits::Last),
                seq(&a, 0, &[1, 2, 3], every(a.len())),
                seq(&b, 0, &[4], Logits::All),
                seq(&b[..2], 0, &[11], Logits::Skip),
                seq(&b, 0, &[12], Logits::Hidden { from: 1, to: 3 }),
            ],
            &mut pool,
        )
        .unwrap();
    assert!(out[3].is_none());
    // Rows 1 and 2 of b's: what b alone gives there.
    let b_alone = model
        .forward_batch(&[seq(&b, 0, &[13], every(b.len()))], &mut pool)
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(out[4].as_deref(), Some(&b_alone[dim..3 * dim]));
    let hidden = out[1].as_ref().unwrap();
    assert_eq!(hidden.len(), a.len() * dim);
    assert_eq!(out[0].as_ref().unwrap().len(), vocab);
    assert_eq!(out[2].as_ref().unwrap().len(), b.len() * vocab);
    // Alone, and in two chunks: the same bits.
    let alone = model
        .forward_batch(&[seq(&a, 0, &[5, 6, 7], Logits::All)], &mut pool)
        .unwrap()
        .remove(0)
        .unwrap();
    let first = model
        .forward_batch(&[seq(&a[..4], 0, &[8, 9, 10], every(4))], &mut pool)
        .unwrap()
        .remove(0)
        .unwrap();
    let rest = model
        .forward_batch(
            &[seq(&a[4..], 4, &[8, 9, 10], every(a.len() - 4))],
            &mut pool,
        )
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(
        [first, rest].concat(),
        *hidden,
        "chunked hidden states differ"
    );
    // Through the output matrix (dequantized, in f32): each position's logits.
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let name = if content.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let w = content
        .tensor(&mut file, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let h = Tensor::from_slice(hidden, (a.len(), dim), &Device::Cpu).unwrap();
    let projected: Vec<f32> = h
        .matmul(&w.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for p in 0..a.len() {
        let (got, want) = (
            &projected[p * vocab..][..vocab],
            &alone[p * vocab..][..vocab],
        );
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        // The lm head quantizes its input rows to 8 bits; a wrong row is off by the scale.
        assert!(diff / scale < 0.02, "position {p}: {}", diff / scale);
        assert_eq!(argmax(got), argmax(want), "position {p}");
    }
}
