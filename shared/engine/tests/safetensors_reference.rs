//! Tiny random Llama, Llama-3 (rope scaling), Qwen2 (qkv bias), Qwen3 (q/k norm, wide heads) and
//! Mistral checkpoints written by Hugging Face transformers (scripts/fixtures/tiny_models.py):
//! every position's logits and the greedy continuation must match transformers' own, with the
//! engine run as one rank and as tensor-parallel groups of 2, 3 and 4.

mod common;

use common::*;
use serde_json::Value;
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, ForwardItem, PagedEngine};
use tandem_engine::{Mode, NewRequest};
use tandem_protocol::SamplingParams;
use tandem_tokenizer::{ChatMessage, ModelFiles, ModelFormat, Tokenizer};

/// f32 on both sides (weights and KV cache); the difference is summation order only.
const TOLERANCE: f32 = 1e-4;

fn reference(name: &str) -> (ModelFiles, Value) {
    let dir = fixture(name);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    // Only tiny-llama ships a tokenizer; the engine needs none.
    (ModelFiles { format: ModelFormat::Folder(dir), name: name.to_string() }, r)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check(name: &str) {
    // 4 query heads over 2 KV heads: 2 ranks hold a KV head each, 3 ranks share one, 4 ranks
    // compute a query head each. Every degree must match transformers as one rank does.
    for tp in 1..=4 {
        check_at(name, tp);
    }
}

fn check_at(name: &str, tp: usize) {
    let (files, r) = reference(name);
    // An f32 KV cache: the comparison is of summation order, not of the cache's rounding.
    let cfg = tandem_engine::EngineConfig { tp, kv_dtype: tandem_protocol::KvDtype::F32, ..small_cache() };
    let mut engine = PagedEngine::new(CpuEngine::load(&files, &cfg).unwrap());
    let tokens = ids(&r["tokens"]);
    engine.add_sequence(1, &tokens).unwrap();
    let logits = engine.forward(&[ForwardItem { seq: 1, tokens: tokens.clone(), all_logits: true }]).unwrap().remove(0);
    let want = r["logits"].as_array().unwrap();
    assert_eq!(logits.len(), want.len());
    let mut worst = 0f32;
    for (pos, (ours, theirs)) in logits.iter().zip(want).enumerate() {
        let theirs: Vec<f32> = theirs.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            worst = worst.max((a - b).abs());
        }
        assert!(worst < TOLERANCE, "{name} at TP={tp}: position {pos} differs by {worst}");
    }
    engine.release(1);

    // Greedy continuation through the batcher (prefill, then one token per step).
    let mut b = Batcher::from_paged(engine.into_dyn(), BatcherConfig::default());
    b.add(NewRequest {
        id: 2,
        prompt: tokens,
        params: SamplingParams::greedy(8),
        seed: 0,
        eos_ids: vec![],
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar: None,
    });
    assert_eq!(run_all(&mut b).remove(&2).unwrap(), ids(&r["greedy"]), "{name} at TP={tp}: greedy tokens");
}

#[test]
fn llama_matches_transformers() {
    check("tiny-llama");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("tiny-llama3");
}

#[test]
fn qwen2_qkv_bias_matches_transformers() {
    check("tiny-qwen2");
}

#[test]
fn qwen3_qk_norm_matches_transformers() {
    check("tiny-qwen3");
}

#[test]
fn mistral_matches_transformers() {
    check("tiny-mistral");
}

#[test]
fn folder_tokenizer_and_chat_template_match_transformers() {
    let (files, r) = reference("tiny-llama");
    let tok = Tokenizer::load(&files).unwrap();
    for case in r["tokenization"].as_array().unwrap() {
        assert_eq!(tok.encode(case["text"].as_str().unwrap()).unwrap(), ids(&case["tokens"]), "{}", case["text"]);
    }
    let chat = &r["chat"];
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), chat["text"].as_str().unwrap());
    assert_eq!(tok.encode_chat(&messages).unwrap(), ids(&chat["tokens"]));
}
