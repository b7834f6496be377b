//! Workloads have the token counts they claim, counted by the model's tokenizer.

mod common;

use common::counter;
use serde_json::json;
use tandem_loadtest::{dataset, DatasetSpec};

#[test]
fn random_prompts_have_the_requested_token_counts() {
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 200, output_len: 50, range_ratio: 0.5 };
    let requests = dataset::build(&spec, &counter, 40, 9).unwrap();
    let mut texts = 0;
    for r in &requests {
        assert!((100..=300).contains(&r.prompt_len), "prompt of {} tokens", r.prompt_len);
        assert!((25..=75).contains(&r.output_len), "output of {} tokens", r.output_len);
        // The reported count is the tokenizer's count of the text actually sent.
        assert_eq!(r.prompt_len, counter.prompt_tokens(&r.prompt).unwrap());
        texts += usize::from(r.prompt.chars().count() > r.prompt_len / 2);
    }
    assert_eq!(texts, requests.len(), "prompts are text, not empty");
    let lens: std::collections::BTreeSet<usize> = requests.iter().map(|r| r.prompt_len).collect();
    assert!(lens.len() > 10, "lengths are drawn, not fixed: {lens:?}");
    // The same seed gives the same workload; another seed another.
    assert_eq!(requests, dataset::build(&spec, &counter, 40, 9).unwrap());
    assert_ne!(requests, dataset::build(&spec, &counter, 40, 10).unwrap());
}

#[test]
fn random_prompt_lengths_hit_the_target() {
    let counter = counter();
    let spec = DatasetSpec::Random { input_len: 128, output_len: 8, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 30, 4).unwrap();
    let off: Vec<usize> = requests.iter().map(|r| r.prompt_len).filter(|&n| n != 128).collect();
    assert!(off.is_empty(), "prompts off their 128-token target: {off:?}");
}

#[test]
fn shared_prefix_prompts_share_their_prefix_tokens() {
    let counter = counter();
    let spec = DatasetSpec::Prefix { prefix_len: 256, num_prefixes: 3, suffix_len: 16, output_len: 8, range_ratio: 0.0 };
    let requests = dataset::build(&spec, &counter, 12, 1).unwrap();
    let ids: Vec<Vec<u32>> = requests.iter().map(|r| counter.tokenizer().encode(&r.prompt).unwrap()).collect();
    for (i, r) in requests.iter().enumerate() {
        assert!((256 + 8..=256 + 24).contains(&r.prompt_len), "prompt of {} tokens", r.prompt_len);
        let same = &ids[i % 3];
        let shared = same.iter().zip(&ids[i]).take_while(|(a, b)| a == b).count();
        assert!(shared >= 250, "request {i} shares only {shared} tokens with its group");
        if i % 3 != 0 {
            let other = &ids[0];
            let shared = other.iter().zip(&ids[i]).take_while(|(a, b)| a == b).count();
            assert!(shared < 10, "request {i} shares {shared} tokens with another group");
        }
    }
    assert_ne!(requests[0].prompt, requests[3].prompt, "suffixes differ");
}

#[test]
fn sharegpt_turns_become_prompt_and_output_length() {
    let counter = counter();
    let long_answer = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let data = json!([
        {"id": "a", "conversations": [
            {"from": "human", "value": "Tell me a short story about a fox and a dog."},
            {"from": "gpt", "value": long_answer},
            {"from": "human", "value": "Another?"}
        ]},
        {"id": "too-short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": "Is anyone there at all today?"}]}
    ]);
    let dir = common::scratch();
    let path = common::path_in(&dir, "sharegpt.json");
    std::fs::write(&path, data.to_string()).unwrap();

    let spec = DatasetSpec::ShareGpt { path: path.clone(), output_len: None };
    let requests = dataset::build(&spec, &counter, 3, 0).unwrap();
    assert_eq!(requests.len(), 3, "the one usable conversation is used again");
    for r in &requests {
        assert_eq!(r.prompt, "Tell me a short story about a fox and a dog.");
        assert_eq!(r.prompt_len, counter.prompt_tokens(&r.prompt).unwrap());
        assert_eq!(r.output_len, counter.completion_tokens(&long_answer).unwrap());
        assert!(r.output_len > 30);
    }
    let fixed = DatasetSpec::ShareGpt { path, output_len: Some(7) };
    assert_eq!(dataset::build(&fixed, &counter, 1, 0).unwrap()[0].output_len, 7);
    let missing = DatasetSpec::ShareGpt { path: "/nonexistent/sharegpt.json".into(), output_len: None };
    assert!(dataset::build(&missing, &counter, 1, 0).is_err());
}
