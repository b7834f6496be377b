//! Bad input gives an error that names the problem, never a panic: a missing model file, a
//! corrupt or truncated GGUF, an architecture the engine does not implement, a prompt longer
//! than the context.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use common::*;
use tandem_engine::{Batcher, BatcherConfig, CpuEngine, EngineError, Event, Mode, NewRequest};
use tandem_protocol::SamplingParams;
use tandem_tokenizer::{ModelFiles, ModelFormat, Tokenizer};

/// A folder of its own under the system's temporary folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-bad-input-{}-{name}", std::process::id()));
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

fn gguf_files(path: &Path) -> ModelFiles {
    ModelFiles { format: ModelFormat::Gguf(path.to_path_buf()), name: "bad".into() }
}

fn load_error(files: &ModelFiles) -> String {
    match CpuEngine::load(files, &small_cache()) {
        Ok(_) => panic!("{:?} loaded", files.format),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_model_file_is_a_clear_error() {
    for spec in ["/nonexistent/model.gguf", "models/missing.gguf", "./missing-folder"] {
        let err = ModelFiles::resolve(spec).unwrap_err().to_string();
        assert!(err.contains(spec) && err.contains("no such file or folder"), "{spec}: {err}");
        assert!(!err.contains("download"), "{spec} is a path, not a hub id: {err}");
    }
    // Past resolution (the file went away in between), loading says the same.
    let err = load_error(&gguf_files(Path::new("/nonexistent/model.gguf")));
    assert!(err.contains("/nonexistent/model.gguf") && err.contains("No such file"), "{err}");
    let folder = ModelFiles { format: ModelFormat::Folder("/nonexistent/folder".into()), name: "bad".into() };
    let err = load_error(&folder);
    assert!(err.contains("/nonexistent/folder"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_is_refused_by_name() {
    let scratch = Scratch::new("corrupt");
    let garbage = scratch.path("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model, just some text with a .gguf name\n").unwrap();
    // GGUF magic and version, then a header that claims far more than the file holds.
    let lying = scratch.path("lying.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1_000_000u64.to_le_bytes());
    bytes.extend(1_000_000u64.to_le_bytes());
    std::fs::write(&lying, bytes).unwrap();

    for path in [&garbage, &lying] {
        let files = ModelFiles::resolve(path.to_str().unwrap()).unwrap();
        let err = load_error(&files);
        assert!(err.contains(path.to_str().unwrap()) && err.contains("not a readable GGUF file"), "{err}");
        let err = Tokenizer::load(&files).unwrap_err().to_string();
        assert!(err.contains(path.to_str().unwrap()) && err.contains("not a readable GGUF file"), "{err}");
    }
}

#[test]
fn a_truncated_gguf_is_refused_before_loading() {
    let model = default_model();
    let ModelFormat::Gguf(source) = &model.format else { panic!("the default model is a GGUF") };
    let bytes = std::fs::read(source).unwrap();
    let scratch = Scratch::new("truncated");

    // Cut inside the header: the metadata cannot be read.
    let header_cut = scratch.path("header.gguf");
    std::fs::write(&header_cut, &bytes[..4096]).unwrap();
    let err = load_error(&gguf_files(&header_cut));
    assert!(err.contains("not a readable GGUF file"), "{err}");

    // Cut inside the tensors: the header reads, the weights are not all there.
    let data_cut = scratch.path("data.gguf");
    std::fs::write(&data_cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&gguf_files(&data_cut));
    assert!(err.contains("truncated GGUF file"), "{err}");
    assert!(err.contains(&format!("the file has {}", bytes.len() / 2)), "{err}");
    // The whole file needs every byte it has (give or take alignment padding at the end).
    let needed: u64 = err.split("need ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(needed <= bytes.len() as u64 && needed + 64 > bytes.len() as u64, "{needed} of {}", bytes.len());
}

#[test]
fn an_unsupported_gguf_architecture_is_named() {
    let scratch = Scratch::new("gguf-arch");
    let path = scratch.path("neox.gguf");
    let embed =
        QTensor::quantize(&Tensor::zeros((8, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), candle_core::quantized::GgmlDType::F32)
            .unwrap();
    let arch = Value::String("gpt_neox".into());
    let blocks = Value::U32(1);
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &[("general.architecture", &arch), ("gpt_neox.block_count", &blocks)], &[("token_embd.weight", &embed)])
        .unwrap();
    drop(file);

    let err = load_error(&ModelFiles::resolve(path.to_str().unwrap()).unwrap());
    assert!(err.contains("unsupported GGUF architecture `gpt_neox`"), "{err}");
}

#[test]
fn an_unsupported_safetensors_architecture_is_named() {
    let tiny = fixture("tiny-llama");
    // A GPT-NeoX config (Pythia's fields), and one of a family whose config shares none of
    // Llama's fields: both must be refused for what they are, not for a missing field.
    let neox = r#"{"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 320,
        "max_position_embeddings": 128, "rotary_pct": 0.25, "use_parallel_residual": true}"#;
    let mamba = r#"{"architectures": ["MambaForCausalLM"], "model_type": "mamba", "d_model": 32, "n_layer": 2, "vocab_size": 320}"#;
    for (model_type, config) in [("gpt_neox", neox), ("mamba", mamba)] {
        let scratch = Scratch::new(model_type);
        std::fs::write(scratch.path("config.json"), config).unwrap();
        for f in ["tokenizer.json", "model.safetensors"] {
            std::fs::copy(tiny.join(f), scratch.path(f)).unwrap();
        }
        let files = ModelFiles::resolve(scratch.0.to_str().unwrap()).unwrap();
        let err = match CpuEngine::load(&files, &small_cache()) {
            Ok(_) => panic!("a {model_type} folder loaded"),
            Err(e) => e,
        };
        assert!(matches!(err, EngineError::Config(_)), "{err:?}");
        assert!(err.to_string().contains(&format!("unsupported model_type `{model_type}`")), "{err}");
    }
}

#[test]
fn a_prompt_longer_than_the_context_fails_that_request_only() {
    let tiny = ModelFiles { format: ModelFormat::Folder(fixture("tiny-llama")), name: "tiny-llama".into() };
    let engine = CpuEngine::load(&tiny, &small_cache()).unwrap();
    let mut b = Batcher::new(Box::new(engine), BatcherConfig::default());
    let request = |id, len: usize| NewRequest {
        id,
        prompt: (0..len as u32).map(|i| 3 + i % 300).collect(),
        params: SamplingParams::greedy(4),
        seed: 0,
        eos_ids: vec![],
        mode: Mode::Full,
        resumed: Vec::new(),
        grammar: None,
    };
    // The fixture's context is 128 tokens.
    b.add(request(1, 200));
    b.add(request(2, 10));
    let mut failed = Vec::new();
    let mut tokens = 0;
    while b.has_work() {
        for e in b.step() {
            match e {
                Event::Failed { id, error } => failed.push((id, error)),
                Event::Token { id, .. } => {
                    assert_eq!(id, 2);
                    tokens += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, 1);
    let error = &failed[0].1;
    assert!(error.message.contains("prompt of 200 tokens") && error.message.contains("context of 128"), "{error}");
    assert_eq!(error.code, tandem_protocol::ErrorCode::ContextLengthExceeded);
    assert_eq!(tokens, 4, "the other request runs on");
}
