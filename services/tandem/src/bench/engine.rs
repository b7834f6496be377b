//! `tandem bench engine` (decode and prefill speed of the CUDA engine on performance shapes) and
//! `tandem bench gpu-check` (its correctness checks), both on a GPU of this machine.

use std::path::PathBuf;
use tandem_runtime::Device;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_cuda::bench::{self, Row};
use tandem_cuda::checks::{self, Check};

fn list(s: &str) -> Result<Vec<usize>> {
    s.split(',').filter(|x| !x.is_empty()).map(|x| x.trim().parse().with_context(|| format!("not a number: {x}"))).collect()
}

fn device(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => anyhow::bail!("--device cpu: the CUDA engine's benchmark and checks need cuda or cuda:N"),
    }
}

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Model shapes: llama-1b, llama-8b (comma-separated).
    #[arg(long, default_value = "llama-1b,llama-8b")]
    pub shape: String,
    /// Decode batch sizes.
    #[arg(long, default_value = "1,8,32,128,256")]
    pub batches: String,
    /// Decode context lengths (tokens already in each sequence's cache).
    #[arg(long, default_value = "512,4096")]
    pub contexts: String,
    /// Prefill prompt lengths.
    #[arg(long, default_value = "512,2048,8192")]
    pub prefill: String,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value = "cuda:0")]
    pub device: Device,
    /// Tensor-parallel degrees to run, each a group of GPUs from `--device` (comma-separated).
    #[arg(long, default_value = "1")]
    pub tp: String,
    /// Run decode passes eagerly instead of as captured graphs.
    #[arg(long)]
    pub no_graphs: bool,
    /// Add a per-stage device-time breakdown (one eager pass) to each decode and prefill row.
    #[arg(long)]
    pub profile: bool,
    /// Projection formats to run, each a model of its own (comma-separated: bf16, fp8; default
    /// what TANDEM_CUDA_WEIGHTS names, else bf16).
    #[arg(long)]
    pub weights: Option<String>,
    /// Instead of whole passes, time each projection of the shapes alone, in bf16 and FP8, for
    /// these token counts (comma-separated).
    #[arg(long)]
    pub projections: Option<String>,
    /// Write the JSON result here.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn engine(args: &EngineArgs) -> Result<()> {
    let dev = device(args.device)?;
    let gpu = tandem_cuda::Gpu::open(dev)?;
    let ceil = bench::ceilings(&gpu)?;
    eprintln!("{}: copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s", ceil.gpu, ceil.copy_gbps, ceil.matrix_tflops);
    if let Some(tokens) = &args.projections {
        let shapes: Vec<String> = args.shape.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let rows = bench::projections(&gpu, &shapes, &list(tokens)?, args.iters.max(1) * 10)?;
        let out = serde_json::json!({ "ceilings": ceil, "projections": rows });
        if let Some(path) = &args.output {
            std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        }
        println!(
            "{:<9} {:<8} {:>6} {:>6} {:>5} {:<5} {:<24} {:>9} {:>7}",
            "shape", "stage", "rows", "cols", "n", "dtype", "path", "us", "GB/s"
        );
        for r in &rows {
            println!(
                "{:<9} {:<8} {:>6} {:>6} {:>5} {:<5} {:<24} {:>9.2} {:>7.0}",
                r.shape, r.stage, r.rows, r.cols, r.tokens, r.dtype, r.path, r.us, r.weight_gbps
            );
        }
        return Ok(());
    }
    drop(gpu);
    let mut rows: Vec<Row> = Vec::new();
    let tps = list(&args.tp)?;
    let formats: Vec<Option<tandem_cuda::WeightFormat>> = match &args.weights {
        None => vec![None],
        Some(w) => w
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| tandem_cuda::WeightFormat::parse(x.trim()).map(Some))
            .collect::<Result<_, _>>()?,
    };
    let mut runs = Vec::new();
    for s in args.shape.split(',').filter(|s| !s.is_empty()) {
        for &t in &tps {
            for &f in &formats {
                runs.push((s, t, f));
            }
        }
    }
    for (shape, tp, weights) in runs {
        let spec = bench::Spec {
            shape: shape.to_string(),
            batches: list(&args.batches)?,
            contexts: list(&args.contexts)?,
            prefill_lens: list(&args.prefill)?,
            warmup: args.warmup,
            iters: args.iters,
            device: dev,
            tp,
            graphs: !args.no_graphs,
            profile: args.profile,
            weights,
        };
        let done = bench::run(&spec, &ceil, |r| eprintln!("{}", line(r)))?;
        rows.extend(done);
    }
    let out = serde_json::json!({ "ceilings": ceil, "rows": rows });
    if let Some(path) = &args.output {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    println!(
        "{:<9} {:<8} {:<5} {:>3} {:>5} {:>6} {:>10} {:>9} {:>6}",
        "shape", "phase", "dtype", "tp", "batch", "len", "tok/s", "ms", "util"
    );
    for r in &rows {
        println!("{}", line(r));
    }
    Ok(())
}

fn line(r: &Row) -> String {
    let len = r.context.or(r.prompt_len).unwrap_or(0);
    match &r.error {
        Some(e) => format!("{:<9} {:<8} {:<5} {:>3} {:>5} {:>6} {e}", r.shape, r.phase, r.dtype, r.tp, r.batch, len),
        None => format!(
            "{:<9} {:<8} {:<5} {:>3} {:>5} {:>6} {:>10.0} {:>9.3} {:>5.1}% {}",
            r.shape,
            r.phase,
            r.dtype,
            r.tp,
            r.batch,
            len,
            r.tokens_per_s.unwrap_or(0.0),
            r.step_ms.or(r.time_ms).unwrap_or(0.0),
            100.0 * r.mbu.or(r.mfu).unwrap_or(0.0),
            r.breakdown_ms.iter().map(|(l, ms)| format!("{l}={ms:.3}")).collect::<Vec<_>>().join(" ")
        ),
    }
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Folder of reference models (from scripts/gpu/reference.py).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// A model (GGUF or folder) whose greedy tokens on the GPU must equal the CPU engine's.
    #[arg(long)]
    pub model: Option<String>,
    /// Greedy tokens per prompt for --model.
    #[arg(long, default_value_t = 8)]
    pub tokens: usize,
    /// How many leading greedy tokens must equal the CPU engine's.
    #[arg(long, default_value_t = 4)]
    pub must_match: usize,
    /// With --model: token ids of a text (a JSON array, or a JSON object with a `tokens` array
    /// such as `tandem bench perplexity` writes) over which the model with FP8 projections, with
    /// an FP8 KV cache and with both is compared with the bf16 one (perplexity, logits, top-1
    /// agreement, greedy continuations).
    #[arg(long)]
    pub fp8_text: Option<PathBuf>,
    /// Tokens a window of --fp8-text (each window one prefill from an empty cache).
    #[arg(long, default_value_t = 512)]
    pub fp8_window: usize,
    #[arg(long, default_value = "cuda:0")]
    pub device: Device,
    /// Tensor-parallel degrees the reference models run at (comma-separated); each degree above
    /// 1 is also compared with one GPU on the same weights.
    #[arg(long, default_value = "1")]
    pub tp: String,
    /// Which kernel check groups run (comma-separated): attention, sampling, checksums,
    /// projections, fp8.
    #[arg(long, default_value = "attention,sampling,checksums,projections,fp8")]
    pub groups: String,
    /// The attention cases run: on a bf16 cache, an FP8 one, or both.
    #[arg(long, default_value = "both", value_parser = ["bf16", "fp8", "both"])]
    pub attention_cache: String,
    /// Only the attention cases whose longest context is at most this (the float64 reference
    /// of a 128k context takes minutes on the host).
    #[arg(long)]
    pub attention_max_context: Option<usize>,
    #[arg(long)]
    pub output: Option<PathBuf>,
}

const CHECK_GROUPS: [&str; 5] = ["attention", "sampling", "checksums", "projections", "fp8"];

fn show(c: &Check) -> String {
    let err = c.rel_err.map(|e| format!("{e:.2e}")).unwrap_or_default();
    format!("{} {:<70} {:>9} {}", if c.passed { "ok  " } else { "FAIL" }, c.name, err, c.detail)
}

pub fn check(args: &CheckArgs) -> Result<()> {
    let dev = device(args.device)?;
    let gpu = tandem_cuda::Gpu::open(dev)?;
    for (name, regs, local, shared) in gpu.k.resources() {
        eprintln!("kernel {name}: {regs} registers, {local} B local, {shared} B shared");
    }
    let groups: Vec<&str> = args.groups.split(',').map(str::trim).filter(|g| !g.is_empty()).collect();
    if let Some(bad) = groups.iter().find(|g| !CHECK_GROUPS.contains(g)) {
        bail!("unknown check group {bad:?} (groups: {})", CHECK_GROUPS.join(", "));
    }
    let mut all: Vec<Check> = Vec::new();
    if groups.contains(&"attention") {
        for (i, case) in checks::attention_cases().iter().enumerate() {
            if args.attention_cache != "both" && (args.attention_cache == "fp8") != case.fp8 {
                continue;
            }
            if args.attention_max_context.is_some_and(|m| case.ctx.iter().any(|&c| c > m)) {
                continue;
            }
            all.push(checks::attention_case(&gpu, case, 100 + i as u64)?);
            eprintln!("{}", show(all.last().expect("just pushed")));
        }
    }
    for group in groups.iter().filter(|g| **g != "attention") {
        let found = match *group {
            "sampling" => checks::sampling(&gpu)?,
            "checksums" => checks::block_checksums(&gpu)?,
            "projections" => checks::projections(&gpu)?,
            _ => checks::fp8(&gpu)?,
        };
        for c in found {
            eprintln!("{}", show(&c));
            all.push(c);
        }
    }
    drop(gpu);
    if let Some(dir) = &args.reference {
        for tp in list(&args.tp)? {
            let mut found = checks::reference_models(dir, dev, tp, tandem_cuda::WeightFormat::Bf16)?;
            if tp == 1 {
                found.extend(checks::reference_models(dir, dev, tp, tandem_cuda::WeightFormat::Fp8)?);
            }
            if tp > 1 {
                found.extend(checks::group_against_single(dir, dev, tp)?);
            }
            for c in found {
                eprintln!("{}", show(&c));
                all.push(c);
            }
        }
    }
    if let Some(model) = &args.model {
        let prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"];
        for c in checks::greedy_vs_cpu(model, &prompts, args.tokens, args.must_match, dev)? {
            eprintln!("{}", show(&c));
            all.push(c);
        }
        if let Some(path) = &args.fp8_text {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)?;
            let ids = json.get("tokens").unwrap_or(&json);
            let text: Vec<u32> =
                serde_json::from_value(ids.clone()).with_context(|| format!("{}: no array of token ids", path.display()))?;
            for c in checks::fp8_against_bf16(model, &text, args.fp8_window, &prompts, 32, dev, &checks::Fp8Variant::ALL)? {
                eprintln!("{}", show(&c));
                all.push(c);
            }
        }
    }
    if let Some(path) = &args.output {
        std::fs::write(path, serde_json::to_string_pretty(&all)?)?;
    }
    let failed = all.iter().filter(|c| !c.passed).count();
    println!("{} checks, {failed} failed", all.len());
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}
