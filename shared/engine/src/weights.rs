//! Loading weights from GGUF (quantized, kept quantized for matmuls) or safetensors (dense f32).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use tandem_tokenizer::{ModelFiles, ModelFormat};

use crate::config::ModelConfig;
use crate::{EngineError, Result};

/// A linear layer `y = x Wᵀ + b`; `W` quantized or dense.
pub(crate) struct Linear {
    w: Matrix,
    b: Option<Vec<f32>>,
}

/// A linear layer's matrix: Q4_1 and Q8_0 through the project's own kernels, anything else
/// through candle's (dense, or the other quantized types).
pub(crate) enum Matrix {
    Candle(QMatMul),
    Own(tandem_kernels::QMatrix),
}

impl Linear {
    /// Output features.
    pub fn rows(&self) -> usize {
        match &self.w {
            Matrix::Candle(QMatMul::QTensor(t)) => t.shape().dims()[0],
            Matrix::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dims()[0],
            Matrix::Own(w) => w.rows(),
        }
    }

    /// `[m × rows]` outputs of `m` input rows laid end to end in `x`.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let cols = x.len() / m.max(1);
        let mut y = match &self.w {
            Matrix::Candle(w) => w.forward(&Tensor::from_slice(x, (m, cols), &Device::Cpu)?)?.flatten_all()?.to_vec1()?,
            Matrix::Own(w) => {
                if cols != w.cols() || cols * m != x.len() {
                    return Err(EngineError::Load(format!(
                        "a matmul of {} values in {m} rows by a matrix of {} columns",
                        x.len(),
                        w.cols()
                    )));
                }
                let mut out = vec![0f32; m * w.rows()];
                w.matmul(x, m, &mut out);
                out
            }
        };
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(y)
    }

    /// One layer computing what `parts` compute, outputs side by side, where their matrices
    /// can be stacked (the project's kernels, one format, the same inputs); `None` otherwise.
    fn stacked(parts: &[&Linear]) -> Option<Linear> {
        let ws: Vec<&tandem_kernels::QMatrix> = parts
            .iter()
            .map(|p| match &p.w {
                Matrix::Own(w) => Some(w),
                Matrix::Candle(_) => None,
            })
            .collect::<Option<_>>()?;
        let w = tandem_kernels::QMatrix::stack(&ws)?;
        let b = if parts.iter().any(|p| p.b.is_some()) {
            Some(parts.iter().flat_map(|p| p.b.clone().unwrap_or_else(|| vec![0.0; p.rows()])).collect())
        } else {
            None
        };
        Some(Linear { w: Matrix::Own(w), b })
    }
}

/// Linear layers over the same input, run as one product where their matrices stack (Q, K and
/// V; gate and up): the input is quantized once and the threads split one larger product.
pub(crate) enum Stacked {
    One { layer: Linear, widths: Vec<usize> },
    Apart(Vec<Linear>),
}

impl Stacked {
    pub fn new(parts: Vec<Linear>) -> Self {
        match Linear::stacked(&parts.iter().collect::<Vec<_>>()) {
            Some(layer) => Self::One { layer, widths: parts.iter().map(Linear::rows).collect() },
            None => Self::Apart(parts),
        }
    }

    /// Each part's `[m × rows]` outputs.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Apart(parts) => parts.iter().map(|p| p.forward_rows(x, m)).collect(),
            Self::One { layer, widths } => {
                let y = layer.forward_rows(x, m)?;
                let total: usize = widths.iter().sum();
                let mut outs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(w * m)).collect();
                for row in y.chunks_exact(total) {
                    let mut at = 0;
                    for (out, w) in outs.iter_mut().zip(widths) {
                        out.extend_from_slice(&row[at..at + w]);
                        at += w;
                    }
                }
                Ok(outs)
            }
        }
    }
}

/// Whether Q4_1 and Q8_0 matrices go to the project's kernels (the default) or, with
/// `TANDEM_CPU_KERNELS=candle`, stay with candle's (kept for comparison: see
/// docs/performance.md).
fn own_kernels() -> bool {
    static OWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| std::env::var("TANDEM_CPU_KERNELS").map_or(true, |v| v != "candle"))
}

/// The matrix a linear layer multiplies by: with `own`, Q4_1 and Q8_0 bytes repacked for the
/// project's kernels; anything else kept for candle.
fn matrix_of(q: QMatMul, own: bool) -> Result<Matrix> {
    use candle_core::quantized::GgmlDType;
    use tandem_kernels::Format;
    if let QMatMul::QTensor(t) = &q {
        let format = match t.dtype() {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        if let (Some(format), true) = (format, own) {
            let (rows, cols) = t.shape().dims2()?;
            return tandem_kernels::QMatrix::from_ggml(format, &t.data()?, rows, cols)
                .map(Matrix::Own)
                .ok_or_else(|| EngineError::Load(format!("a {format:?} matrix of [{rows}, {cols}] whose bytes do not match")));
        }
    }
    Ok(Matrix::Candle(q))
}

/// Where tensors come from; names are given in the Hugging Face convention and mapped for GGUF.
pub enum WeightSource {
    Gguf { content: Content, file: File },
    Dense(HashMap<String, Tensor>),
}

fn gguf_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = table.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else { return hf.to_string() };
    let (layer, name) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{layer}.{mapped}")
}

impl WeightSource {
    /// Opens a model's weights and reads its architecture.
    pub fn open(files: &ModelFiles) -> Result<(ModelConfig, Self)> {
        match &files.format {
            ModelFormat::Gguf(path) => {
                let src = Self::open_gguf(path)?;
                let Self::Gguf { content, .. } = &src else { unreachable!("opened as gguf") };
                Ok((ModelConfig::from_gguf(content)?, src))
            }
            ModelFormat::Folder(dir) => {
                let text =
                    std::fs::read_to_string(dir.join("config.json")).map_err(|e| EngineError::Load(format!("{}: {e}", dir.display())))?;
                Ok((ModelConfig::from_hf_json(&text)?, Self::open_safetensors(dir)?))
            }
        }
    }

    /// Reads a GGUF file's header and checks that the file holds every tensor it lists, so a
    /// truncated download is refused here rather than halfway through loading.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let content = tandem_tokenizer::read_gguf(&mut file)
            .map_err(|e| EngineError::Load(format!("{}: not a readable GGUF file: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?.len();
        let mut needed = 0u64;
        for (name, t) in &content.tensor_infos {
            // Checked: the dimensions are whatever the file says, and their product need not fit.
            let bytes = t
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| (n / t.ggml_dtype.block_size()).checked_mul(t.ggml_dtype.type_size()))
                .ok_or_else(|| {
                    EngineError::Load(format!("{}: tensor {name} of shape {:?} is too large", path.display(), t.shape.dims()))
                })?;
            needed = needed.max(content.tensor_data_offset.saturating_add(t.offset).saturating_add(bytes as u64));
        }
        if needed > len {
            return Err(EngineError::Load(format!(
                "{}: truncated GGUF file: its tensors need {needed} bytes, the file has {len}",
                path.display()
            )));
        }
        Ok(Self::Gguf { content, file })
    }

    /// Every `*.safetensors` file of a folder, converted to f32; FP8 (E4M3) tensors are
    /// dequantised with their scales (see [`dense_f32`]).
    pub fn open_safetensors(dir: &Path) -> Result<Self> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| EngineError::Load(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(EngineError::Load(format!("{}: no .safetensors files", dir.display())));
        }
        let mut raw = HashMap::new();
        for f in files {
            raw.extend(candle_core::safetensors::load(&f, &Device::Cpu)?);
        }
        Ok(Self::Dense(dense_f32(raw, fp8_block(dir))?))
    }

    pub fn contains(&self, hf: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(hf)),
            Self::Dense(map) => map.contains_key(hf),
        }
    }

    /// A tensor as dense f32, of the shape the model's config implies: a file whose metadata
    /// disagrees with its tensors is refused while loading, not by an index out of range in the
    /// first forward pass.
    pub fn dense_of(&mut self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.dense(hf)?;
        check_shape(hf, t.dims(), shape)?;
        Ok(t)
    }

    /// A tensor as dense f32.
    pub fn dense(&mut self, hf: &str) -> Result<Tensor> {
        match self {
            Self::Gguf { content, file } => {
                let q = content.tensor(file, &gguf_name(hf), &Device::Cpu).map_err(|e| missing(hf, e))?;
                Ok(q.dequantize(&Device::Cpu)?)
            }
            Self::Dense(map) => map.get(hf).cloned().ok_or_else(|| missing(hf, "not in safetensors")),
        }
    }

    /// A matrix for matmuls of `[rows, cols]` (checked as in [`Self::dense_of`]), kept in its
    /// stored (possibly quantized) type.
    pub(crate) fn matrix(&mut self, hf: &str, rows: usize, cols: usize) -> Result<QMatMul> {
        match self {
            Self::Gguf { content, file } => {
                let q = content.tensor(file, &gguf_name(hf), &Device::Cpu).map_err(|e| missing(hf, e))?;
                check_shape(hf, q.shape().dims(), &[rows, cols])?;
                Ok(QMatMul::from_qtensor(q)?)
            }
            Self::Dense(_) => Ok(QMatMul::Tensor(self.dense_of(hf, &[rows, cols])?)),
        }
    }

    /// A linear layer from `cols` inputs to `rows` outputs.
    pub(crate) fn linear(&mut self, hf_prefix: &str, bias: bool, rows: usize, cols: usize) -> Result<Linear> {
        self.linear_part(hf_prefix, bias, (rows, cols), 0..rows, 0..cols)
    }

    /// The part of a `shape = [rows, cols]` linear layer that a tensor-parallel rank holds:
    /// output rows `rs` (column-parallel layers) or input columns `cs` (row-parallel layers).
    /// A bias follows the rows.
    pub(crate) fn linear_part(
        &mut self,
        hf_prefix: &str,
        bias: bool,
        shape: (usize, usize),
        rs: Range<usize>,
        cs: Range<usize>,
    ) -> Result<Linear> {
        let w = matrix_of(self.matrix_part(&format!("{hf_prefix}.weight"), shape, rs.clone(), cs)?, own_kernels())?;
        let b = if bias {
            Some(self.dense_of(&format!("{hf_prefix}.bias"), &[shape.0])?.narrow(0, rs.start, rs.len())?.to_vec1()?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }

    /// Rows `rs` and columns `cs` of a `[rows, cols]` matrix, kept quantized where the cut falls
    /// on the quantization blocks and leaves each row an even number of them (candle's
    /// quantized dot products take blocks in pairs), dequantized to f32 otherwise.
    fn matrix_part(&mut self, hf: &str, (rows, cols): (usize, usize), rs: Range<usize>, cs: Range<usize>) -> Result<QMatMul> {
        if rs == (0..rows) && cs == (0..cols) {
            return self.matrix(hf, rows, cols);
        }
        if rs.end > rows || cs.end > cols || rs.is_empty() || cs.is_empty() {
            return Err(EngineError::Load(format!("tensor {hf}: part {rs:?} × {cs:?} of [{rows}, {cols}]")));
        }
        if let Self::Gguf { content, file } = self {
            let q = content.tensor(file, &gguf_name(hf), &Device::Cpu).map_err(|e| missing(hf, e))?;
            check_shape(hf, q.shape().dims(), &[rows, cols])?;
            let dtype = q.dtype();
            let (block, size) = (dtype.block_size(), dtype.type_size());
            if cs.start.is_multiple_of(block) && cs.end.is_multiple_of(block) && (cs.len() / block).is_multiple_of(2) {
                let data = q.data()?;
                let row_bytes = cols / block * size;
                let (from, to) = (cs.start / block * size, cs.end / block * size);
                let mut part = Vec::with_capacity(rs.len() * (to - from));
                for r in rs.clone() {
                    part.extend_from_slice(&data[r * row_bytes + from..r * row_bytes + to]);
                }
                let storage = QStorage::from_data(Cow::Owned(part), &Device::Cpu, dtype)?;
                return Ok(QMatMul::from_qtensor(QTensor::new(storage, (rs.len(), cs.len()))?)?);
            }
        }
        let full = self.dense_of(hf, &[rows, cols])?;
        Ok(QMatMul::Tensor(full.narrow(0, rs.start, rs.len())?.narrow(1, cs.start, cs.len())?.contiguous()?))
    }

    /// The quantization block of a stored matrix along its input dimension (1 when dense), so
    /// tensor-parallel cuts can fall on whole pairs of blocks.
    pub(crate) fn block_of(&self, hf: &str) -> usize {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.get(&gguf_name(hf)).map_or(1, |t| t.ggml_dtype.block_size()),
            Self::Dense(_) => 1,
        }
    }

    /// The `rope_freqs` tensor of Llama 3 GGUFs: per-pair divisors of the RoPE frequencies.
    pub fn rope_freq_factors(&mut self) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Gguf { content, .. } if content.tensor_infos.contains_key("rope_freqs.weight") => {
                Ok(Some(self.dense("rope_freqs.weight")?.flatten_all()?.to_vec1()?))
            }
            _ => Ok(None),
        }
    }
}

/// Tensors of a safetensors checkpoint as f32. An E4M3 tensor `X` is stored with its scale in
/// `X_scale` (compressed-tensors and ModelOpt checkpoints: one value for the tensor, or one per
/// output row) or `X_scale_inv` (block-wise checkpoints such as DeepSeek-V3's and Qwen3's FP8
/// releases: one value per tile of the matrix, multiplied in despite its name); its f32 value is
/// the E4M3 value times its scale. An E4M3 tensor without a scale, or with a scale of another
/// shape, is refused: read as it is, it would be wrong by a factor per row and still run.
///
/// The tile comes from `config.json`'s `quantization_config.weight_block_size` where the
/// checkpoint names it (`block`); otherwise the scale's shape must divide the matrix exactly.
pub fn dense_f32(mut raw: HashMap<String, Tensor>, block: Option<(usize, usize)>) -> Result<HashMap<String, Tensor>> {
    let fp8: Vec<String> = raw.iter().filter(|(_, t)| t.dtype() == DType::F8E4M3).map(|(n, _)| n.clone()).collect();
    let mut out = HashMap::with_capacity(raw.len());
    for name in fp8 {
        let q = raw.remove(&name).expect("listed above");
        let scale = raw
            .remove(&format!("{name}_scale"))
            .or_else(|| raw.remove(&format!("{name}_scale_inv")))
            .ok_or_else(|| EngineError::Load(format!("{name}: an FP8 (E4M3) tensor with neither {name}_scale nor {name}_scale_inv")))?;
        let w = dequantize_fp8(&name, &q, &scale, block)?;
        out.insert(name, w);
    }
    for (name, t) in raw {
        let t = t.to_dtype(DType::F32)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// `q` (E4M3) times `scale`: one value, one per row (`[rows]` or `[rows, 1]`), or one per tile
/// of a matrix (`[⌈rows/br⌉, ⌈cols/bc⌉]` for tiles of br × bc, the last ones possibly cut).
fn dequantize_fp8(name: &str, q: &Tensor, scale: &Tensor, block: Option<(usize, usize)>) -> Result<Tensor> {
    let w = q.to_dtype(DType::F32)?;
    let s: Vec<f32> = scale.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (dims, sdims) = (q.dims().to_vec(), scale.dims().to_vec());
    let refuse = || {
        EngineError::Load(format!(
            "{name}: FP8 tensor of shape {dims:?} with a scale of shape {sdims:?}: not a per-tensor, per-row or per-tile layout"
        ))
    };
    if s.len() == 1 {
        return Ok(w.broadcast_mul(&Tensor::new(s[0], &Device::Cpu)?)?);
    }
    let &[rows, cols] = dims.as_slice() else { return Err(refuse()) };
    if s.len() == rows && (sdims.as_slice() == [rows] || sdims.as_slice() == [rows, 1]) {
        return Ok(w.broadcast_mul(&Tensor::from_vec(s, (rows, 1), &Device::Cpu)?)?);
    }
    let &[sr, sc] = sdims.as_slice() else { return Err(refuse()) };
    if sr == 0 || sc == 0 {
        return Err(refuse());
    }
    let (br, bc) = match block {
        Some((br, bc)) if br > 0 && bc > 0 && rows.div_ceil(br) == sr && cols.div_ceil(bc) == sc => (br, bc),
        None if rows % sr == 0 && cols % sc == 0 => (rows / sr, cols / sc),
        _ => return Err(refuse()),
    };
    let mut v: Vec<f32> = w.flatten_all()?.to_vec1()?;
    for (i, x) in v.iter_mut().enumerate() {
        let (r, c) = (i / cols, i % cols);
        *x *= s[(r / br) * sc + c / bc];
    }
    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
}

/// `quantization_config.weight_block_size` of a checkpoint folder's `config.json`, if any.
fn fp8_block(dir: &Path) -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let b = v.get("quantization_config")?.get("weight_block_size")?.as_array()?;
    match b.as_slice() {
        [r, c] => Some((r.as_u64()? as usize, c.as_u64()? as usize)),
        _ => None,
    }
}

fn check_shape(hf: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::Load(format!("tensor {hf} has shape {got:?}; the model's config implies {want:?}")))
    }
}

fn missing(name: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("tensor {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn hf_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.layers.3.self_attn.k_proj.weight"), "blk.3.attn_k.weight");
        assert_eq!(gguf_name("model.layers.12.mlp.down_proj.weight"), "blk.12.ffn_down.weight");
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
    }

    /// Q4_1 and Q8_0 layers through the project's kernels write what candle's write, to the
    /// last bits the float sums' order moves, for a decode row and for prefill batches (odd
    /// sizes included); stacked, they write what each writes alone.
    #[test]
    fn own_kernel_layers_match_candle() {
        use super::{matrix_of, Linear, Matrix, Stacked};
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        use candle_core::{Device, Tensor};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let mut layers = Vec::new();
            for (rows, cols) in [(96, 576), (40, 1536), (7, 64)] {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
                let q = || QTensor::quantize(&w, dtype).unwrap();
                let candle = Linear { w: Matrix::Candle(QMatMul::from_qtensor(q()).unwrap()), b: None };
                let own = Linear { w: matrix_of(QMatMul::from_qtensor(q()).unwrap(), true).unwrap(), b: None };
                assert!(matches!(own.w, Matrix::Own(_)), "{dtype:?} goes to the project's kernels");
                for m in [1usize, 3, 17] {
                    let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2f32..2.0)).collect();
                    let (a, b) = (candle.forward_rows(&x, m).unwrap(), own.forward_rows(&x, m).unwrap());
                    assert_eq!(a.len(), b.len());
                    let scale = a.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-3);
                    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                    assert!(worst <= 1e-5 * scale, "{dtype:?} {rows}×{cols}, {m} rows: off by {worst} in values up to {scale}");
                }
                if cols == 576 {
                    layers.push(own);
                    let w2: Vec<f32> = (0..13 * cols).map(|_| rng.random_range(-0.1f32..0.1)).collect();
                    let w2 = QTensor::quantize(&Tensor::from_vec(w2, (13, cols), &Device::Cpu).unwrap(), dtype).unwrap();
                    layers.push(Linear { w: matrix_of(QMatMul::from_qtensor(w2).unwrap(), true).unwrap(), b: Some(vec![0.5; 13]) });
                }
            }
            let x: Vec<f32> = (0..5 * 576).map(|_| rng.random_range(-2f32..2.0)).collect();
            let alone: Vec<Vec<f32>> = layers.iter().map(|l| l.forward_rows(&x, 5).unwrap()).collect();
            let stacked = Stacked::new(layers);
            assert!(matches!(stacked, Stacked::One { .. }), "one format and width stack");
            assert_eq!(stacked.forward_rows(&x, 5).unwrap(), alone);
        }
    }
}
