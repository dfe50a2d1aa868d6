//! `edgeinfer backend-check`'s measures (src/model/check.rs), run on the CPU against itself:
//! the same code a GPU machine runs against the CPU. The CPU backend is deterministic, so
//! its logits agree bit for bit and packed steps equal sequences alone.

mod common;

use candle_core::Device;
use common::synthetic::{self, Spec};
use edgeinfer::model::check;
use edgeinfer::model::{GgufFile, Llama};

fn tiny() -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    synthetic::write(&path, &Spec::default());
    let model = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    (dir, model)
}

#[test]
fn cpu_agrees_with_itself_and_packing_changes_nothing() {
    let (_dir, a) = tiny();
    let (_dir2, b) = tiny();
    let prompt: Vec<u32> = (1..20).collect();
    let agreement = check::compare(&a, &b, &prompt, 6).unwrap();
    assert_eq!(agreement.steps, 7);
    assert_eq!(agreement.same_argmax, 7);
    assert_eq!(agreement.max_abs_diff, 0.0);
    let prompts = vec![vec![3, 4, 5], (1..40).collect(), vec![7], (2..30).collect()];
    assert_eq!(check::batch_invariance(&a, &prompts).unwrap(), 0.0);
    let hidden = check::compare_hidden(&a, &b, &prompt).unwrap();
    assert_eq!((hidden.positions, hidden.max_abs_diff), (19, 0.0));
    assert!((hidden.min_cosine - 1.0).abs() < 1e-6, "{hidden:?}");
}

#[test]
fn a_different_model_is_seen_as_different() {
    let (_dir, a) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.gguf");
    synthetic::write(
        &path,
        &Spec {
            seed: 99,
            ..Spec::default()
        },
    );
    let b = Llama::load(&mut GgufFile::open(&path).unwrap(), &Device::Cpu).unwrap();
    let agreement = check::compare(&a, &b, &[1, 2, 3, 4], 3).unwrap();
    assert!(agreement.max_abs_diff > 0.01, "{agreement:?}");
    let hidden = check::compare_hidden(&a, &b, &[1, 2, 3, 4]).unwrap();
    assert!(hidden.min_cosine < 0.99, "{hidden:?}");
}

#[test]
fn speed_measures_count_every_stream() {
    let (_dir, a) = tiny();
    let s = check::decode_speed(&a, 3, 9, 4).unwrap();
    assert_eq!((s.streams, s.steps), (3, 4));
    assert!(s.seconds > 0.0 && s.tokens_per_second > 0.0);
    let expected = 12.0 / s.seconds;
    assert!((s.tokens_per_second - expected).abs() < 1e-6 * expected);
    assert!(check::prefill_speed(&a, 33).unwrap() > 0.0);
}
