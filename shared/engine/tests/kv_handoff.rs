//! The KV cache as the prefill-to-decode handoff, continuous batching and prefix sharing, all on
//! the real default model.

mod common;

use common::*;
use tandem_engine::{EngineError, Event, ForwardItem, Mode};

fn prompt(tok: &tandem_tokenizer::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode_chat(&[tandem_tokenizer::ChatMessage::new("user", text)]).unwrap()
}

#[test]
fn export_then_import_on_another_engine_continues_exactly() {
    let files = default_model();
    let (engine_a, tok) = load(&files);
    let p = prompt(&tok, "Name three colors of the rainbow.");
    let n = 16;

    // Reference: never moving.
    let mut whole = batcher(engine_a);
    whole.add(greedy_request(1, p.clone(), n, &tok));
    let reference = run_all(&mut whole).remove(&1).unwrap();

    // Prefill on one instance, export, import into a second instance, decode there.
    let (engine_p, _) = load(&files);
    let mut prefill = batcher(engine_p);
    prefill.add(tandem_engine::NewRequest { mode: Mode::PrefillOnly, ..greedy_request(7, p.clone(), n, &tok) });
    let (first, kv) = prefill_handoff(&mut prefill);
    assert_eq!(kv.layout.token_count, p.len());
    assert_eq!(kv.blocks.len(), p.len().div_ceil(16));
    assert_eq!(prefill.engine().stats().used_blocks, 0, "prefill side frees its blocks after export");

    let (engine_d, _) = load(&files);
    let mut decode = batcher(engine_d);
    decode.add_imported(greedy_request(7, p.clone(), n, &tok), &kv, first).unwrap();
    let mut moved = vec![first];
    moved.extend(run_all(&mut decode).remove(&7).unwrap_or_default());
    assert_eq!(moved, reference, "the handoff must not change a single token");
    assert_eq!(decode.engine().stats().used_blocks, 0);
}

#[test]
fn mismatched_kv_is_refused() {
    let files = default_model();
    let (mut a, tok) = load(&files);
    let p = prompt(&tok, "Hi");
    a.add_sequence(1, &p).unwrap();
    a.forward(&[ForwardItem { seq: 1, tokens: p.clone(), all_logits: false }]).unwrap();
    let kv = a.export(1).unwrap();

    // Checksums are the receiving transport's to check (see tandem-transfer's tests); a sealed
    // export's checksums hold.
    assert_eq!(kv.first_corrupt_block(), None);
    let (mut b, _) = load(&files);
    let mut bad = kv.clone();
    bad.blocks.pop();
    assert!(matches!(b.import(1, &bad).unwrap_err(), EngineError::Import(_)));
    let mut bad = kv.clone();
    bad.layout.head_dim = 128;
    assert!(matches!(b.import(1, &bad).unwrap_err(), EngineError::Layout(_)));
    assert_eq!(b.stats().used_blocks, 0, "a refused import takes no blocks");
    // A worker keeping its cache in f32 refuses f16 blocks (and the other way round): the
    // descriptor names the type, and the bytes would be read as the wrong numbers.
    let f32_cfg = tandem_engine::EngineConfig { kv_dtype: tandem_protocol::KvDtype::F32, ..small_cache() };
    let mut c = tandem_engine::PagedEngine::new(tandem_engine::CpuEngine::load(&files, &f32_cfg).unwrap());
    match c.import(1, &kv).unwrap_err() {
        EngineError::Layout(m) => assert_eq!(m.field, "dtype", "{m:?}"),
        other => panic!("expected a layout mismatch, got {other:?}"),
    }
    assert_eq!(c.stats().used_blocks, 0);
    // The CPU engine keeps no FP8 cache (a GPU worker's): asked for one, it says so at load.
    let fp8_cfg = tandem_engine::EngineConfig { kv_dtype: tandem_protocol::KvDtype::Fp8E4m3, ..small_cache() };
    let err = tandem_engine::CpuEngine::load(&files, &fp8_cfg).unwrap_err().to_string();
    assert!(err.contains("f16 or f32") && err.contains("fp8"), "{err}");
    b.import(1, &kv).unwrap();
    assert_eq!(b.seq_len(1), Some(p.len()));
}

#[test]
fn batched_decode_of_different_lengths_equals_decoding_alone() {
    let files = default_model();
    let (engine, tok) = load(&files);
    let prompts = [
        prompt(&tok, "Write a haiku about the sea."),
        tok.encode("The quick brown fox").unwrap(),
        prompt(&tok, "List the first five prime numbers and explain why each one is prime."),
    ];
    let n = 12;
    let mut together = batcher(engine);
    for (i, p) in prompts.iter().enumerate() {
        together.add(greedy_request(i as u64, p.clone(), n, &tok));
    }
    let batched = run_all(&mut together);

    let (engine, _) = load(&files);
    let mut alone = batcher(engine);
    for (i, p) in prompts.iter().enumerate() {
        alone.add(greedy_request(100 + i as u64, p.clone(), n, &tok));
        let solo = run_all(&mut alone).remove(&(100 + i as u64)).unwrap();
        assert_eq!(batched[&(i as u64)], solo, "sequence {i} changed when batched");
    }
}

#[test]
fn prefix_sharing_reuses_blocks_and_keeps_the_output() {
    let files = default_model();
    let system = "You are a meticulous assistant. Answer in one short sentence. Never use lists. \
                  Always mention the weather in Paris, whatever the question is about.";
    let msgs = |q: &str| vec![tandem_tokenizer::ChatMessage::new("system", system), tandem_tokenizer::ChatMessage::new("user", q)];
    let (engine, tok) = load(&files);
    let first = tok.encode_chat(&msgs("What is two plus two?")).unwrap();
    let second = tok.encode_chat(&msgs("What colour is the sky?")).unwrap();
    let shared = first.iter().zip(&second).take_while(|(a, b)| a == b).count();
    assert!(shared >= 32, "the prompts share {shared} tokens; need at least two blocks");

    let mut warm = batcher(engine);
    warm.add(greedy_request(1, first, 8, &tok));
    run_all(&mut warm);
    let before = warm.engine().stats().prefix_hit_blocks;
    warm.add(greedy_request(2, second.clone(), 8, &tok));
    let mut usage = None;
    let mut tokens = Vec::new();
    while warm.has_work() {
        for e in warm.step() {
            match e {
                Event::Token { token, .. } => tokens.push(token),
                Event::Finished { usage: u, .. } => usage = Some(u),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let hits = warm.engine().stats().prefix_hit_blocks - before;
    assert_eq!(hits as usize, shared / 16, "every full shared block is reused");
    assert_eq!(usage.unwrap().cached_tokens, shared / 16 * 16);

    let (cold_engine, _) = load(&files);
    let mut cold = batcher(cold_engine);
    cold.add(greedy_request(2, second, 8, &tok));
    assert_eq!(run_all(&mut cold).remove(&2).unwrap(), tokens, "reused blocks give the same output");
}

#[test]
fn a_tiny_cache_refuses_clearly_and_shares_fairly() {
    let files = default_model();
    let tok = tandem_tokenizer::Tokenizer::load(&files).unwrap();
    // Room for two blocks (32 tokens): layers × k|v × block × kv heads × head dim × f16.
    let cfg = tandem_engine::EngineConfig { kv_cache_bytes: 2 * 30 * 2 * 16 * 3 * 64 * 2, ..Default::default() };
    let engine = tandem_engine::PagedEngine::new(tandem_engine::CpuEngine::load(&files, &cfg).unwrap());
    assert_eq!(engine.stats().total_blocks, 2);
    assert_eq!(engine.info().max_context, 32);
    let mut b = batcher(engine);
    b.add(greedy_request(1, tok.encode(&"word ".repeat(40)).unwrap(), 4, &tok));
    match &b.step()[..] {
        [Event::Failed { id: 1, error }] => {
            assert!(error.message.contains("context of 32"), "{error}");
            assert_eq!(error.code, tandem_protocol::ErrorCode::ContextLengthExceeded);
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // Two requests that each grow to two blocks: one waits for the other's blocks, both end
    // at the context limit, and nothing leaks.
    for id in [2, 3] {
        b.add(greedy_request(id, tok.encode("Once upon a time").unwrap(), 64, &tok));
    }
    let mut finished = Vec::new();
    while b.has_work() {
        for e in b.step() {
            match e {
                Event::Finished { id, reason, usage } => {
                    assert_eq!(reason, tandem_protocol::FinishReason::Length);
                    assert_eq!(usage.prompt_tokens + usage.completion_tokens, 32);
                    finished.push(id);
                }
                Event::Failed { id, error } => panic!("request {id} failed: {error}"),
                _ => {}
            }
        }
    }
    finished.sort();
    assert_eq!(finished, vec![2, 3]);
    assert_eq!(b.engine().stats().used_blocks, 0);
}

#[test]
fn fetched_prefix_blocks_are_reused_as_if_computed_here() {
    let files = default_model();
    let (mut a, tok) = load(&files);
    let p = prompt(&tok, &"A long shared system prompt about the history of ships and the sea. ".repeat(6));
    assert!(p.len() > 48, "several full blocks");
    a.add_sequence(1, &p).unwrap();
    let reference = a.forward(&[ForwardItem { seq: 1, tokens: p.clone(), all_logits: false }]).unwrap();
    let kv = a.export(1).unwrap();
    let full = p.len() / 16;

    // A second engine gets the full blocks, as it would from the cluster's block store.
    let (mut b, _) = load(&files);
    let added = b.insert_cached(tandem_protocol::ROOT_HASH, &p[..full * 16], &owned(&kv.blocks[..full])).unwrap();
    assert_eq!(added, full);
    assert_eq!(b.stats().used_blocks, 0, "fetched blocks wait unreferenced in the cache");
    let hashes = tandem_protocol::block_hashes(&p, 16);
    assert_eq!(b.cached_prefix(&hashes), full);
    assert_eq!(b.insert_cached(tandem_protocol::ROOT_HASH, &p[..16], &owned(&kv.blocks[..1])).unwrap(), 0, "already there");

    let cached = b.add_sequence(2, &p).unwrap();
    assert_eq!(cached, (p.len() - 1) / 16 * 16, "the prefix is shared instead of recomputed");
    let got = b.forward(&[ForwardItem { seq: 2, tokens: p[cached..].to_vec(), all_logits: false }]).unwrap();
    let (r, g) = (&reference[0][0], &got[0][0]);
    let max_diff = r.iter().zip(g).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "logits after a fetched prefix differ by {max_diff}");
    assert!(b.stats().prefix_hit_blocks as usize >= cached / 16);

    // Wrong sizes are refused, not written.
    assert!(b.insert_cached(tandem_protocol::ROOT_HASH, &p[..16], &[vec![0u8; 7]]).is_err());
    assert!(b.insert_cached(tandem_protocol::ROOT_HASH, &p[..15], &owned(&kv.blocks[..1])).is_err());
}

/// Blocks as the owned buffers the block store hands to `insert_cached`.
fn owned(blocks: &[tandem_protocol::Bytes]) -> Vec<Vec<u8>> {
    blocks.iter().map(|b| b.to_vec()).collect()
}
