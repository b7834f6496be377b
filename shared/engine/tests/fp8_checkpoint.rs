//! FP8 (E4M3) safetensors checkpoints: the tiny-llama fixture's projections quantised to E4M3
//! with each scale layout such checkpoints ship (one per row as `weight_scale` [rows, 1], one for
//! the tensor, one per tile as `weight_scale_inv` with `weight_block_size` in `config.json`, the
//! last tiles cut short) must give the logits of an f32 checkpoint holding the dequantised
//! values, exactly; an E4M3 tensor without a scale, or with a scale of no known layout, is
//! refused at load.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use tandem_engine::{CpuEngine, EngineConfig, ForwardItem, PagedEngine};
use tandem_tokenizer::{ModelFiles, ModelFormat};

const E4M3_MAX: f32 = 448.0;
/// The tile of the block-scaled tensors: neither fixture dimension (32, 64, 16) is a multiple,
/// so the last tiles of each matrix are cut.
const BLOCK: usize = 24;

struct Folder(PathBuf);

impl Folder {
    fn new(name: &str, tensors: &HashMap<String, Tensor>, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tandem-fp8-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        Self(dir)
    }

    fn files(&self) -> ModelFiles {
        ModelFiles { format: ModelFormat::Folder(self.0.clone()), name: "tiny-fp8".into() }
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    Row,
    Tensor,
    Tile,
}

/// `w` quantised to E4M3 with `layout`'s scales (amax / 448 per group), and the f32 matrix
/// those bytes and scales stand for.
fn quantise(w: &Tensor, layout: Layout) -> (Tensor, Tensor, Tensor) {
    let (rows, cols) = w.dims2().unwrap();
    let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let (gr, gc) = match layout {
        Layout::Row => (1, cols),
        Layout::Tensor => (rows, cols),
        Layout::Tile => (BLOCK, BLOCK),
    };
    let (sr, sc) = (rows.div_ceil(gr), cols.div_ceil(gc));
    let mut scale = vec![0f32; sr * sc];
    for (i, x) in v.iter().enumerate() {
        let s = &mut scale[(i / cols / gr) * sc + (i % cols) / gc];
        *s = s.max(x.abs() / E4M3_MAX);
    }
    let scaled: Vec<f32> = v.iter().enumerate().map(|(i, x)| x / scale[(i / cols / gr) * sc + (i % cols) / gc]).collect();
    let q = Tensor::from_vec(scaled, (rows, cols), &Device::Cpu).unwrap().to_dtype(DType::F8E4M3).unwrap();
    let qf: Vec<f32> = q.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let deq: Vec<f32> = qf.iter().enumerate().map(|(i, x)| x * scale[(i / cols / gr) * sc + (i % cols) / gc]).collect();
    let scale = match layout {
        Layout::Row => Tensor::from_vec(scale, (rows, 1), &Device::Cpu),
        Layout::Tensor => Tensor::from_vec(scale, 1, &Device::Cpu),
        Layout::Tile => Tensor::from_vec(scale, (sr, sc), &Device::Cpu),
    }
    .unwrap();
    (q, scale, Tensor::from_vec(deq, (rows, cols), &Device::Cpu).unwrap())
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-llama").join("model.safetensors"), &Device::Cpu).unwrap().into_iter().collect()
}

/// The fixture with every layer projection in E4M3: layer 0 per row, layer 1's attention per
/// tensor, layer 1's MLP per tile. Returns the FP8 checkpoint's tensors and the f32 ones they
/// stand for.
fn fp8_checkpoint() -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let base = fixture_tensors();
    let (mut fp8, mut deq) = (HashMap::new(), HashMap::new());
    let mut quantised = 0;
    for (name, t) in &base {
        let layout = match name.strip_prefix("model.layers.") {
            Some(rest) if name.ends_with("_proj.weight") => match (rest.starts_with("0."), rest.contains(".mlp.")) {
                (true, _) => Some(Layout::Row),
                (false, false) => Some(Layout::Tensor),
                (false, true) => Some(Layout::Tile),
            },
            _ => None,
        };
        match layout {
            Some(layout) => {
                let (q, s, d) = quantise(t, layout);
                let key = if matches!(layout, Layout::Tile) { format!("{name}_scale_inv") } else { format!("{name}_scale") };
                fp8.insert(name.clone(), q);
                fp8.insert(key, s);
                deq.insert(name.clone(), d);
                quantised += 1;
            }
            None => {
                fp8.insert(name.clone(), t.clone());
                deq.insert(name.clone(), t.clone());
            }
        }
    }
    assert_eq!(quantised, 14, "two layers of seven projections");
    (fp8, deq)
}

fn config(block: Option<usize>) -> String {
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap()).unwrap();
    if let Some(b) = block {
        c["quantization_config"] = serde_json::json!({ "quant_method": "fp8", "weight_block_size": [b, b] });
    }
    c.to_string()
}

fn logits(files: &ModelFiles) -> Vec<Vec<f32>> {
    let cfg = EngineConfig { kv_cache_bytes: 1 << 20, kv_dtype: tandem_protocol::KvDtype::F32, ..EngineConfig::default() };
    let mut engine = PagedEngine::new(CpuEngine::load(files, &cfg).unwrap());
    let tokens: Vec<u32> = vec![1, 17, 42, 99, 256, 3, 77, 300];
    engine.add_sequence(1, &tokens).unwrap();
    engine.forward(&[ForwardItem { seq: 1, tokens, all_logits: true }]).unwrap().remove(0)
}

fn load_error(tensors: &HashMap<String, Tensor>, block: Option<usize>, name: &str) -> String {
    let folder = Folder::new(name, tensors, &config(block));
    match CpuEngine::load(&folder.files(), &EngineConfig { kv_cache_bytes: 1 << 20, ..EngineConfig::default() }) {
        Ok(_) => panic!("{name}: loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_fp8_checkpoint_gives_the_logits_of_its_dequantised_weights() {
    let (fp8, deq) = fp8_checkpoint();
    let a = Folder::new("fp8", &fp8, &config(Some(BLOCK)));
    let b = Folder::new("deq", &deq, &config(None));
    let base = Folder::new("base", &fixture_tensors(), &config(None));
    let (ours, want, original) = (logits(&a.files()), logits(&b.files()), logits(&base.files()));
    assert_eq!(ours.len(), want.len());
    let (mut worst, mut moved, mut scale) = (0f32, 0f32, 0f32);
    for ((x, y), z) in ours.iter().zip(&want).zip(&original) {
        for ((p, q), r) in x.iter().zip(y).zip(z) {
            worst = worst.max((p - q).abs());
            moved = moved.max((p - r).abs());
            scale = scale.max(r.abs());
        }
    }
    // The same f32 products on both sides.
    assert_eq!(worst, 0.0, "FP8 checkpoint against its dequantised weights");
    // Quantisation moved the logits, but by a fraction of their size (the tiny random model has
    // 32-wide rows, so E4M3's 3 mantissa bits move them by about a seventh): the scales were
    // applied. Unscaled E4M3 values would be hundreds of times the weights.
    assert!(moved > 0.0 && moved < 0.25 * scale, "moved {moved} against logits up to {scale}");
}

#[test]
fn an_fp8_tensor_without_its_scale_is_refused() {
    let (mut fp8, _) = fp8_checkpoint();
    fp8.remove("model.layers.0.self_attn.q_proj.weight_scale").unwrap();
    let e = load_error(&fp8, Some(BLOCK), "no-scale");
    assert!(e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("_scale"), "{e}");
}

#[test]
fn fp8_scales_of_no_known_layout_are_refused() {
    // A scale vector of the wrong length.
    let (mut fp8, _) = fp8_checkpoint();
    fp8.insert("model.layers.0.self_attn.q_proj.weight_scale".into(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    let e = load_error(&fp8, Some(BLOCK), "bad-len");
    assert!(e.contains("q_proj.weight") && e.contains("[3]"), "{e}");
    // Tiles cut short without the block size in config.json: their size is ambiguous.
    let (fp8, _) = fp8_checkpoint();
    let e = load_error(&fp8, None, "no-block");
    assert!(e.contains("mlp") && e.contains("per-tile"), "{e}");
}
