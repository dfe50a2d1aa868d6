//! Constrained decoding on the default model's 49,152-token vocabulary: the per-step cost of
//! the grammar for 1 and 16 sequences, as the engine pays it. `mask` computes a full token
//! mask for every sequence (the slow path, taken when the model's own pick is refused);
//! `check` only confirms and commits a token the grammar allows (the usual path).
//! `structured` is a strict JSON schema; `structured-gbnf` a JSON grammar in llama.cpp's GBNF.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput};
use edgeinfer::engine::constraint::TokenConstraint;
use edgeinfer::model::{GgufFile, Tokenizer};
use edgeinfer::structured::{ConstraintSpec, Grammars, OutputFormat};
use rand::{Rng, SeedableRng};
use serde_json::json;

const VOCAB: usize = 49_152;

fn grammars() -> Option<Grammars> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!("skipping structured benches: {} is missing", path.display());
        return None;
    }
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).ok()?).ok()?;
    Grammars::new(Arc::new(tok), VOCAB).ok()
}

const JSON_GBNF: &str = r#"
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= "-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
ws ::= | " " | "\n" [ \t]{0,20}
"#;

fn spec() -> ConstraintSpec {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string"}, "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": false},
        "scores": {"type": "array", "items": {"type": "integer"}}},
        "required": ["name", "role", "address", "scores"], "additionalProperties": false});
    ConstraintSpec {
        format: OutputFormat::JsonSchema {
            schema,
            strict: true,
        },
        ..ConstraintSpec::text()
    }
}

/// Picks the most likely allowed token under random logits, as a sampler would.
fn step_masked(c: &mut dyn TokenConstraint, logits: &mut [f32]) -> u32 {
    c.mask(logits).unwrap();
    let tok = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap() as u32;
    c.commit(tok).unwrap();
    tok
}

pub fn bench(c: &mut Criterion) {
    let Some(g) = grammars() else { return };
    run(c, &g, "structured", spec());
    // The same kind of output from llama.cpp's GBNF (one lexeme per character).
    let gbnf = ConstraintSpec {
        format: OutputFormat::Gbnf(JSON_GBNF.into()),
        ..ConstraintSpec::text()
    };
    run(c, &g, "structured-gbnf", gbnf);
}

fn run(c: &mut Criterion, g: &Grammars, name: &str, spec: ConstraintSpec) {
    let fresh = || g.constraint(&spec).unwrap().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let base: Vec<f32> = (0..VOCAB).map(|_| rng.gen_range(-10.0..10.0)).collect();
    // A valid token path (from masks) for the check bench, replayed from the start.
    let mut path = Vec::new();
    let mut walker = fresh();
    for i in 0..48 {
        let mut l = base.clone();
        l.rotate_left(i * 131);
        let t = step_masked(walker.as_mut(), &mut l);
        if Grammars::is_stop_id(g, t) {
            break;
        }
        path.push(t);
    }
    let mut grp = c.benchmark_group(name);
    for n in [1usize, 16] {
        grp.throughput(Throughput::Elements(n as u64));
        let mut seqs: Vec<(Box<dyn TokenConstraint>, usize)> =
            (0..n).map(|_| (fresh(), 0)).collect();
        grp.bench_function(BenchmarkId::new("mask", n), |b| {
            let mut logits = base.clone();
            b.iter(|| {
                for (k, (c, steps)) in seqs.iter_mut().enumerate() {
                    logits.copy_from_slice(&base);
                    logits.rotate_left((*steps * 131 + k * 7) % VOCAB);
                    let t = step_masked(c.as_mut(), &mut logits);
                    *steps += 1;
                    if Grammars::is_stop_id(g, t) || *steps >= 48 {
                        *c = fresh();
                        *steps = 0;
                    }
                }
            })
        });
        let mut seqs: Vec<(Box<dyn TokenConstraint>, usize)> =
            (0..n).map(|_| (fresh(), 0)).collect();
        grp.bench_function(BenchmarkId::new("check", n), |b| {
            b.iter(|| {
                for (c, at) in seqs.iter_mut() {
                    let t = path[*at];
                    assert!(c.allows(t).unwrap());
                    c.commit(t).unwrap();
                    *at += 1;
                    if *at == path.len() {
                        *c = fresh();
                        *at = 0;
                    }
                }
            })
        });
    }
    grp.finish();
}
