//! Prefill-only requests through the batcher: several prompts share a forward pass, a long one is
//! chunked, and each export reports where its time went (queue, passes, read-out) and leaves its
//! checksums to the sender.

use std::time::Duration;

use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{Batcher, BatcherConfig, Event, KvExport, Mode, NewRequest, PrefillTiming};
use tandem_protocol::SamplingParams;

const STEP: Duration = Duration::from_millis(20);

fn request(id: u64, len: usize) -> NewRequest {
    let params = SamplingParams { temperature: 0.0, max_tokens: 8, ..SamplingParams::default() };
    NewRequest {
        id,
        prompt: (1..=len as u32).collect(),
        params,
        seed: 0,
        eos_ids: vec![],
        mode: Mode::PrefillOnly,
        resumed: Vec::new(),
        grammar: None,
    }
}

/// Steps until every request is exported; returns each one's export and timing, by id, and how
/// many steps it took.
fn run(b: &mut Batcher) -> (Vec<(u64, KvExport, PrefillTiming)>, usize) {
    let (mut out, mut steps) = (Vec::new(), 0);
    while b.has_work() {
        steps += 1;
        for e in b.step() {
            match e {
                Event::Token { .. } => {}
                Event::Prefilled { id, kv, timing, .. } => out.push((id, *kv, timing)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    out.sort_by_key(|(id, ..)| *id);
    (out, steps)
}

#[test]
fn prompts_share_a_pass_up_to_the_token_budget() {
    let engine = ScriptedEngine::counting("scripted", 64, 256);
    let mut b = Batcher::new(Box::new(engine), BatcherConfig { max_batch_tokens: 64, max_running: 16 });
    for id in 0..4 {
        b.add(request(id, 16));
    }
    let (done, steps) = run(&mut b);
    assert_eq!(done.len(), 4);
    assert_eq!(steps, 1, "four 16-token prompts fit one 64-token pass");

    // Past the budget, the rest wait for the next pass.
    let engine = ScriptedEngine::counting("scripted", 64, 256);
    let mut b = Batcher::new(Box::new(engine), BatcherConfig { max_batch_tokens: 32, max_running: 16 });
    for id in 0..4 {
        b.add(request(id, 16));
    }
    assert_eq!(run(&mut b).1, 2);
}

#[test]
fn each_export_says_where_its_time_went_and_is_sealed_by_the_sender() {
    let engine = ScriptedEngine::counting("scripted", 64, 256).with_step_delay(STEP);
    // One sequence at a time, 8 tokens a pass: each 16-token prompt takes two passes, and the
    // second prompt waits for both of the first's.
    let mut b = Batcher::new(Box::new(engine), BatcherConfig { max_batch_tokens: 8, max_running: 1 });
    b.add(request(0, 16));
    b.add(request(1, 16));
    let (done, _) = run(&mut b);
    let (first, second) = (&done[0], &done[1]);
    assert!(first.2.queue < STEP, "{:?}", first.2);
    assert!(first.2.compute >= 2 * STEP, "{:?}", first.2);
    assert!(second.2.queue >= 2 * STEP, "{:?}", second.2);
    assert!(second.2.compute >= 2 * STEP && second.2.compute < 4 * STEP, "{:?}", second.2);
    // Two 8-token chunks each.
    assert_eq!((first.2.passes, second.2.passes), (2, 2));

    for (_, kv, _) in done {
        assert_eq!(kv.blocks.len(), 1);
        assert!(kv.checksums.is_empty(), "the engine thread leaves the checksums to the sender");
        let mut sealed = kv.clone();
        sealed.seal();
        assert_eq!(sealed.checksums, vec![KvExport::checksum(&kv.blocks[0])]);
        assert_eq!(sealed.first_corrupt_block(), None);
    }
}
