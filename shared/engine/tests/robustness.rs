//! Bad input from outside never panics the engine; it is refused with an error:
//!
//! - gRPC requests (`grpc::new_request`): arbitrary bytes as a `GenerateRequest`, and arbitrary
//!   sampling parameters (NaN and infinite floats, huge `max_tokens`, empty prompts, token ids
//!   outside the vocabulary). What is accepted then runs to an end on an engine.
//! - Model files: a small valid GGUF (made here from the tiny-llama fixture) truncated anywhere,
//!   with bytes of its header and metadata flipped, or with nonsense metadata values; the
//!   fixture's safetensors truncated or with its header flipped; its `config.json` with
//!   nonsense values. Loading fails with an error, or loads a model that runs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use common::fixture;
use proptest::prelude::*;
use prost::Message;
use tandem_engine::testing::ScriptedEngine;
use tandem_engine::{grpc, Batcher, BatcherConfig, CpuEngine, EngineConfig, EngineHandle, Event, ForwardItem, Mode, PagedEngine};
use tandem_protocol::{pb, ErrorCode, MAX_TOP_LOGPROBS};
use tandem_tokenizer::{ModelFiles, ModelFormat, Tokenizer};

// ---------------------------------------------------------------------------------------------
// gRPC requests
// ---------------------------------------------------------------------------------------------

const VOCAB: usize = 64;

/// An engine handle for `new_request` (which only takes ids from it).
fn handle() -> &'static EngineHandle {
    static H: OnceLock<EngineHandle> = OnceLock::new();
    H.get_or_init(|| {
        EngineHandle::spawn("robustness", Batcher::new(Box::new(ScriptedEngine::counting("m", VOCAB, 8)), BatcherConfig::default()))
    })
}

/// Floats a client may send: in range, at the edges, out of range, NaN and infinities.
fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.5,
            1.0,
            2.0,
            -2.0,
            10.0,
            2.0000002,
            1.0000001,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::EPSILON,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]),
        -3.0f32..12.0,
        any::<f32>(),
    ]
}

fn uint() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..4,
        0u32..300,
        prop::sample::select(vec![u32::MAX, u32::MAX - 1, 1 << 31, VOCAB as u32, VOCAB as u32 - 1]),
        any::<u32>()
    ]
}

fn tokens() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(prop_oneof![4 => 0..VOCAB as u32, 1 => uint()], 0..12)
}

prop_compose! {
    fn sampling()(
        temperature in float(), top_p in float(), top_k in uint(), min_p in float(),
        repetition_penalty in float(), presence_penalty in float(), frequency_penalty in float(),
        max_tokens in uint(), min_tokens in uint(), stop_token_ids in tokens(), ignore_eos in any::<bool>(),
        logprobs in prop::option::of(prop_oneof![0u32..=MAX_TOP_LOGPROBS + 2, any::<u32>()]),
        prompt_logprobs in prop::option::weighted(0.2, prop_oneof![0u32..=MAX_TOP_LOGPROBS + 2, any::<u32>()]),
    ) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,
            max_tokens, min_tokens, stop_token_ids, ignore_eos, logprobs, constraint: String::new(), logit_bias: Default::default(),
            prompt_logprobs,
        }
    }
}

prop_compose! {
    fn generate_request()(
        request_id in ".{0,8}", prompt in tokens(), params in prop::option::weighted(0.95, sampling()),
        seed in any::<u64>(), eos_ids in tokens(), kv_wait_ms in any::<u32>(), resumed in prop_oneof![3 => Just(Vec::new()), 1 => tokens()],
    ) -> pb::GenerateRequest {
        pb::GenerateRequest { request_id, prompt, params, seed, eos_ids, kv_wait_ms, resumed, store_addr: String::new(), compute_prompt: false }
    }
}

/// The ranges the API documents, written out again here as the oracle.
fn acceptable(r: &pb::GenerateRequest) -> bool {
    let Some(p) = &r.params else { return false };
    let within = |v: f32, lo: f32, hi: f32| v.is_finite() && v >= lo && v <= hi;
    within(p.temperature, 0.0, 2.0)
        && within(p.top_p, 0.0, 1.0)
        && p.top_p > 0.0
        && within(p.min_p, 0.0, 1.0)
        && within(p.repetition_penalty, 0.0, 10.0)
        && p.repetition_penalty > 0.0
        && within(p.presence_penalty, -2.0, 2.0)
        && within(p.frequency_penalty, -2.0, 2.0)
        && p.max_tokens >= 1
        && p.min_tokens <= p.max_tokens
        && p.logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS)
        && p.prompt_logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS)
        && !r.prompt.is_empty()
}

/// Runs an accepted request to its end on a small scripted engine (context of 128 tokens).
/// Returns whether it finished (rather than failed).
fn run_to_the_end(req: tandem_engine::NewRequest) -> bool {
    let mut b = Batcher::new(Box::new(ScriptedEngine::counting("m", VOCAB, 8)), BatcherConfig::default());
    let id = req.id;
    b.add(req);
    let mut end = None;
    for _ in 0..1000 {
        if !b.has_work() {
            break;
        }
        for e in b.step() {
            match e {
                Event::Finished { id: i, .. } if i == id => end = Some(true),
                Event::Failed { id: i, error } if i == id => {
                    assert!(!error.message.is_empty());
                    end = Some(false)
                }
                _ => {}
            }
        }
    }
    end.expect("an accepted request ends within the context")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any bytes off the wire: prost decodes them or refuses them, and what decodes is
    /// validated like any request.
    #[test]
    fn arbitrary_bytes_as_a_generate_request(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(r) = pb::GenerateRequest::decode(bytes.as_slice()) {
            let _ = grpc::new_request(handle(), &r, Mode::Full);
        }
    }

    /// Any field values: `new_request` accepts exactly what the documented ranges allow, refuses
    /// the rest with an `invalid_request` naming the parameter, and what it accepts runs to an
    /// end (finished, or failed with a reason such as a token outside the vocabulary).
    #[test]
    fn any_generate_request_is_accepted_or_refused_by_the_documented_ranges(r in generate_request()) {
        match grpc::new_request(handle(), &r, Mode::Full) {
            Ok(req) => {
                prop_assert!(acceptable(&r), "accepted {r:?}");
                let finished = run_to_the_end(req);
                let in_vocab = r.prompt.iter().chain(&r.resumed).all(|&t| (t as usize) < VOCAB);
                let room = r.prompt.len() + r.resumed.len() < 128;
                prop_assert_eq!(finished, in_vocab && room, "{:?}", r);
            }
            Err(e) => {
                prop_assert!(!acceptable(&r), "refused {r:?}: {e}");
                prop_assert_eq!(e.code, ErrorCode::InvalidRequest);
                prop_assert!(!e.message.is_empty() && e.param.is_some(), "{e:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model files
// ---------------------------------------------------------------------------------------------

/// A folder of its own under the system's temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-robustness-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A KV cache of a few blocks: loading stays cheap.
fn tiny_cache() -> EngineConfig {
    EngineConfig { kv_cache_bytes: 64 << 10, ..EngineConfig::default() }
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, name) = rest.split_once('.').unwrap();
    let name = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{name}")
}

/// The tiny-llama fixture's metadata, as GGUF metadata: the model's shape and its vocabulary.
fn tiny_metadata() -> Vec<(String, Value)> {
    let dir = fixture("tiny-llama");
    let tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let mut vocab: Vec<(String, u64)> =
        tok["model"]["vocab"].as_object().unwrap().iter().map(|(t, id)| (t.clone(), id.as_u64().unwrap())).collect();
    vocab.sort_by_key(|(_, id)| *id);
    let specials: Vec<u64> = tok["added_tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Value::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let s = |v: &str| Value::String(v.into());
    vec![
        ("general.architecture".into(), s("llama")),
        ("general.name".into(), s("tiny-llama")),
        ("llama.embedding_length".into(), Value::U32(32)),
        ("llama.attention.head_count".into(), Value::U32(4)),
        ("llama.attention.head_count_kv".into(), Value::U32(2)),
        ("llama.attention.key_length".into(), Value::U32(8)),
        ("llama.feed_forward_length".into(), Value::U32(64)),
        ("llama.block_count".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(128)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-6)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        ("tokenizer.ggml.tokens".into(), Value::Array(vocab.iter().map(|(t, _)| s(t)).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(vocab.iter().map(|(_, id)| Value::I32(if specials.contains(id) { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), s(config["chat_template"].as_str().unwrap())),
    ]
}

/// The tiny-llama fixture's weights, as GGUF tensors (f32).
fn tiny_tensors() -> Vec<(String, QTensor)> {
    let weights = candle_core::safetensors::load(fixture("tiny-llama").join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: Vec<(String, QTensor)> =
        weights.iter().map(|(name, t)| (gguf_name(name), QTensor::quantize(t, GgmlDType::F32).unwrap())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_gguf(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// A valid GGUF of the tiny model, and where its tensor data starts (what comes before is header
/// and metadata).
fn tiny_gguf() -> &'static (Vec<u8>, usize) {
    static G: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
    G.get_or_init(|| {
        let scratch = Scratch::new("gguf-source");
        let path = scratch.path("tiny.gguf");
        write_gguf(&path, &tiny_metadata(), &tiny_tensors());
        let bytes = std::fs::read(&path).unwrap();
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        (bytes, content.tensor_data_offset as usize)
    })
}

fn gguf_files(path: &Path) -> ModelFiles {
    ModelFiles { format: ModelFormat::Gguf(path.to_path_buf()), name: "tiny".into() }
}

/// Loads a model and, if it loads, runs a short prompt through it: either step may fail, neither
/// may panic. Returns whether the model loaded.
fn load_and_run(files: &ModelFiles) -> bool {
    let Ok(engine) = CpuEngine::load(files, &tiny_cache()) else { return false };
    let mut engine = PagedEngine::new(engine);
    let vocab = engine.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..5).map(|i| i % vocab.max(1)).collect();
    if engine.add_sequence(1, &prompt).is_ok() {
        let _ = engine.forward(&[ForwardItem { seq: 1, tokens: prompt, all_logits: false }]);
    }
    true
}

/// Writes `bytes` as a GGUF and loads it: the engine, then the tokenizer. Returns whether each
/// loaded.
fn load_gguf(scratch: &Scratch, bytes: &[u8]) -> (bool, bool) {
    let path = scratch.path("case.gguf");
    std::fs::write(&path, bytes).unwrap();
    let files = gguf_files(&path);
    let engine = load_and_run(&files);
    let tokenizer = match Tokenizer::load(&files) {
        Ok(t) => {
            let _ = t.encode("hello <|im_start|> 123");
            let _ = t.encode_chat(&[tandem_tokenizer::ChatMessage::new("user", "hi")]);
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    };
    (engine, tokenizer)
}

#[test]
fn the_synthesized_gguf_loads_and_runs() {
    let (bytes, data_at) = tiny_gguf();
    assert!(*data_at > 1000 && *data_at < bytes.len(), "{data_at} of {}", bytes.len());
    let scratch = Scratch::new("gguf-valid");
    assert_eq!(load_gguf(&scratch, bytes), (true, true));
}

/// Metadata values that are wrong in every way the loader must survive.
fn nonsense_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![0u32, 1, 2, 3, 5, 7, 8, 9, 16, 31, 33, 64, 1 << 20, u32::MAX]).prop_map(Value::U32),
        prop::sample::select(vec![0u64, 1 << 32, 1 << 62, u64::MAX]).prop_map(Value::U64),
        prop::sample::select(vec![-1i32, i32::MIN, 0, 4]).prop_map(Value::I32),
        prop::sample::select(vec![0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e30]).prop_map(Value::F32),
        Just(Value::String("llama".into())),
        Just(Value::String("".into())),
        Just(Value::Bool(true)),
        Just(Value::Array(vec![])),
        Just(Value::Array(vec![Value::U32(1); 400])),
    ]
}

/// Keys whose values shape the model or its vocabulary.
const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.context_length",
    "llama.vocab_size",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// A GGUF cut short anywhere does not load (the engine needs every tensor byte; the tokenizer
    /// needs the whole header).
    #[test]
    fn a_truncated_gguf_is_refused(cut in any::<prop::sample::Index>()) {
        let (bytes, data_at) = tiny_gguf();
        let cut = cut.index(bytes.len());
        let scratch = Scratch::new("gguf-cut");
        let (engine, tokenizer) = load_gguf(&scratch, &bytes[..cut]);
        prop_assert!(!engine, "loaded a GGUF cut at {cut} of {}", bytes.len());
        prop_assert!(cut >= *data_at || !tokenizer, "a tokenizer from a GGUF cut at {cut}, inside its header");
    }

    /// Bytes of the header and metadata flipped: whatever the file now says, loading it (and
    /// running what loads) never panics.
    #[test]
    fn flipped_header_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6)) {
        let (bytes, data_at) = tiny_gguf();
        let mut bytes = bytes.clone();
        for (at, mask) in flips {
            bytes[at.index(*data_at)] ^= mask;
        }
        let scratch = Scratch::new("gguf-flip");
        load_gguf(&scratch, &bytes);
    }

    /// Metadata values of the wrong type or size, in a well-formed file: loading never panics.
    #[test]
    fn nonsense_metadata_never_panics(changes in prop::collection::vec((prop::sample::select(KEYS), nonsense_value()), 1..4)) {
        let mut metadata: HashMap<String, Value> = tiny_metadata().into_iter().collect();
        for (key, value) in changes {
            metadata.insert(key.to_string(), value);
        }
        let metadata: Vec<(String, Value)> = metadata.into_iter().collect();
        let scratch = Scratch::new("gguf-meta");
        let path = scratch.path("case.gguf");
        write_gguf(&path, &metadata, tiny_tensors_cached());
        load_gguf(&scratch, &std::fs::read(&path).unwrap());
    }
}

fn tiny_tensors_cached() -> &'static [(String, QTensor)] {
    static T: OnceLock<Vec<(String, QTensor)>> = OnceLock::new();
    T.get_or_init(tiny_tensors)
}

/// The tiny-llama folder copied into `scratch`, with `model.safetensors` and `config.json` as
/// given.
fn safetensors_folder(scratch: &Scratch, weights: &[u8], config: &str) -> ModelFiles {
    let dir = fixture("tiny-llama");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(dir.join(f), scratch.path(f)).unwrap();
    }
    std::fs::write(scratch.path("model.safetensors"), weights).unwrap();
    std::fs::write(scratch.path("config.json"), config).unwrap();
    ModelFiles { format: ModelFormat::Folder(scratch.0.clone()), name: "tiny".into() }
}

fn tiny_safetensors() -> &'static (Vec<u8>, usize, String) {
    static S: OnceLock<(Vec<u8>, usize, String)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = fixture("tiny-llama");
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        (bytes, header, std::fs::read_to_string(dir.join("config.json")).unwrap())
    })
}

#[test]
fn the_safetensors_fixture_loads_and_runs() {
    let (bytes, header, config) = tiny_safetensors();
    assert!(*header > 100 && *header < bytes.len());
    let scratch = Scratch::new("st-valid");
    assert!(load_and_run(&safetensors_folder(&scratch, bytes, config)));
}

/// `config.json` fields a model's shape is read from.
const CONFIG_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "model_type",
    "rope_scaling",
];

fn nonsense_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop::sample::select(vec![
        json!(0),
        json!(1),
        json!(3),
        json!(7),
        json!(8),
        json!(16),
        json!(64),
        json!(-1),
        json!(1.5),
        json!(1e300),
        json!(4294967296u64),
        json!(u64::MAX),
        json!(null),
        json!("llama"),
        json!("qwen3"),
        json!(true),
        json!([]),
        json!({"rope_type": "llama3", "factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Safetensors cut short anywhere do not load.
    #[test]
    fn truncated_safetensors_are_refused(cut in any::<prop::sample::Index>()) {
        let (bytes, _, config) = tiny_safetensors();
        let cut = cut.index(bytes.len());
        let scratch = Scratch::new("st-cut");
        prop_assert!(!load_and_run(&safetensors_folder(&scratch, &bytes[..cut], config)), "loaded safetensors cut at {cut}");
    }

    /// Flipped bytes in the safetensors header (its length and its JSON): never a panic.
    #[test]
    fn flipped_safetensors_header_bytes_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6)) {
        let (bytes, header, config) = tiny_safetensors();
        let mut bytes = bytes.clone();
        for (at, mask) in flips {
            bytes[at.index(*header)] ^= mask;
        }
        let scratch = Scratch::new("st-flip");
        load_and_run(&safetensors_folder(&scratch, &bytes, config));
    }

    /// `config.json` with nonsense values: never a panic.
    #[test]
    fn nonsense_config_values_never_panic(changes in prop::collection::vec((prop::sample::select(CONFIG_KEYS), nonsense_json()), 1..4)) {
        let (bytes, _, config) = tiny_safetensors();
        let mut config: serde_json::Value = serde_json::from_str(config).unwrap();
        for (key, value) in changes {
            config[key] = value;
        }
        let scratch = Scratch::new("st-config");
        load_and_run(&safetensors_folder(&scratch, bytes, &config.to_string()));
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs the properties above found to panic the loaders, kept as plain regression tests.
// ---------------------------------------------------------------------------------------------

/// The error of a load that must fail.
fn refused<T>(loaded: Result<T, impl std::fmt::Display>) -> String {
    match loaded {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

/// Loads the tiny GGUF with `changes` to its metadata and the `removed` keys gone; returns the
/// engine's error.
fn gguf_error(changes: &[(&str, Value)], removed: &[&str]) -> String {
    let mut metadata: Vec<(String, Value)> = tiny_metadata();
    metadata.retain(|(k, _)| !removed.contains(&k.as_str()));
    for (key, value) in changes {
        metadata.retain(|(k, _)| k != key);
        metadata.push((key.to_string(), value.clone()));
    }
    let scratch = Scratch::new("gguf-regression");
    let path = scratch.path("case.gguf");
    write_gguf(&path, &metadata, tiny_tensors_cached());
    match CpuEngine::load(&gguf_files(&path), &tiny_cache()) {
        Ok(_) => panic!("loaded with {changes:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tensor_dimensions_whose_product_overflows_are_refused() {
    // `token_embd.weight`'s tensor info: name, 2 dimensions, 32 × 320. Made 2^40 × 2^40, its
    // size no longer fits in 64 bits (the size check multiplied without checking).
    let (bytes, data_at) = tiny_gguf();
    let mut bytes = bytes.clone();
    let name = b"token_embd.weight";
    let at = bytes[..*data_at].windows(name.len()).rposition(|w| w == name).unwrap() + name.len();
    assert_eq!(bytes[at..at + 4], 2u32.to_le_bytes());
    bytes[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[at + 12..at + 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let scratch = Scratch::new("gguf-dims");
    let path = scratch.path("case.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = refused(CpuEngine::load(&gguf_files(&path), &tiny_cache()));
    assert!(err.contains("token_embd.weight") && err.contains("too large"), "{err}");
}

#[test]
fn a_zero_alignment_is_refused() {
    // candle's reader divides by it.
    let err = gguf_error(&[("general.alignment", Value::U32(0))], &[]);
    assert!(err.contains("not a readable GGUF file"), "{err}");
    let scratch = Scratch::new("gguf-align");
    let path = scratch.path("case.gguf");
    let mut metadata = tiny_metadata();
    metadata.push(("general.alignment".into(), Value::U32(0)));
    write_gguf(&path, &metadata, tiny_tensors_cached());
    let err = refused(Tokenizer::load(&gguf_files(&path)));
    assert!(err.contains("not a readable GGUF file"), "{err}");
}

#[test]
fn zero_heads_are_refused_not_divided_by() {
    // Without `key_length`, the head dim is the hidden size over the head count.
    let err = gguf_error(&[("llama.attention.head_count", Value::U32(0))], &["llama.attention.key_length"]);
    assert!(err.contains("heads (0)"), "{err}");
    let (bytes, _, config) = tiny_safetensors();
    let config = config.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 0").replace("\"head_dim\": 8,", "");
    let scratch = Scratch::new("st-heads");
    let err = refused(CpuEngine::load(&safetensors_folder(&scratch, bytes, &config), &tiny_cache()));
    assert!(err.contains("heads (0)"), "{err}");
}

#[test]
fn metadata_that_disagrees_with_the_tensors_is_refused_at_load() {
    // Four KV heads where the tensors hold two: the first forward pass sliced out of range.
    let err = gguf_error(&[("llama.attention.head_count_kv", Value::I32(4))], &[]);
    assert!(err.contains("attn_k") || err.contains("k_proj"), "{err}");
    assert!(err.contains("[32, 32]") && err.contains("[16, 32]"), "{err}");
    let err = gguf_error(&[("llama.embedding_length", Value::U32(64))], &[]);
    assert!(err.contains("embed_tokens"), "{err}");
    // A KV head count far past the tensors: the KV cache would have been sized from it.
    let (bytes, _, config) = tiny_safetensors();
    let config = config.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4294967296");
    let scratch = Scratch::new("st-kv-heads");
    let err = refused(CpuEngine::load(&safetensors_folder(&scratch, bytes, &config), &tiny_cache()));
    assert!(err.contains("heads") || err.contains("shape"), "{err}");
}

#[test]
fn a_token_type_list_longer_than_the_vocabulary_does_not_panic() {
    let scratch = Scratch::new("gguf-types");
    let path = scratch.path("case.gguf");
    let mut metadata = tiny_metadata();
    metadata.retain(|(k, _)| k != "tokenizer.ggml.token_type");
    metadata.push(("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(3); 400])));
    write_gguf(&path, &metadata, tiny_tensors_cached());
    let tok = Tokenizer::load(&gguf_files(&path)).unwrap();
    assert_eq!(tok.vocab_size(), 320);
}
