//! `tandem serve MODEL`: the cluster `tandem up` runs, from a command line written for
//! `vllm serve`. vLLM's names for the settings Tandem has map onto the cluster's workers and
//! gateway; a vLLM flag for something Tandem does not do is refused by name rather than ignored,
//! and the few that ask for what Tandem always does are accepted.

use anyhow::{bail, Result};
use clap::Args;

use crate::up::{UpArgs, UpEngineArgs};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A .gguf file, a model folder or a hub id (default: the embedded SmolLM2-135M-Instruct).
    #[arg(value_name = "MODEL")]
    pub model: Option<String>,
    /// The address the endpoint binds (vLLM binds every interface by default; this binds
    /// loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    #[command(flatten)]
    pub engine: UpEngineArgs,
    /// Tensor-parallel degree of every worker: threads on the CPU, GPUs from `--device cuda:N`.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// Prefix caching is always on (the flag is accepted; `--no-enable-prefix-caching` is not).
    #[arg(long)]
    pub enable_prefix_caching: bool,
    #[arg(long, hide = true)]
    pub no_enable_prefix_caching: bool,
    /// A key clients must present as `Authorization: Bearer KEY` (repeatable).
    #[arg(long = "api-key", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// `auto`: the model's own (bf16 on a GPU; the file's quantization on the CPU), or
    /// `bfloat16` (a GPU's only type).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Where the workers run: `cpu`, or `cuda:N`.
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: tandem_runtime::Device,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    pub prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    pub decode: usize,

    // Accepted: they ask for what happens anyway.
    /// Tool calls are read whenever a request has `tools`.
    #[arg(long, hide = true)]
    enable_auto_tool_choice: bool,
    /// `hermes` (`<tool_call>` blocks) and `llama3_json` (a bare JSON call) are what the gateway
    /// reads; other formats are refused.
    #[arg(long, hide = true)]
    tool_call_parser: Option<String>,
    /// No code from a model repository is ever run here.
    #[arg(long, hide = true)]
    trust_remote_code: bool,
    #[arg(long, hide = true)]
    disable_log_requests: bool,
    /// Long prompts are always computed in chunks.
    #[arg(long, hide = true)]
    enable_chunked_prefill: bool,

    // Refused: each names something this server does not do.
    #[arg(long, hide = true)]
    quantization: Option<String>,
    #[arg(long, hide = true)]
    kv_cache_dtype: Option<String>,
    #[arg(long, hide = true)]
    pipeline_parallel_size: Option<usize>,
    #[arg(long, hide = true)]
    data_parallel_size: Option<usize>,
    #[arg(long, hide = true)]
    enforce_eager: bool,
    #[arg(long, hide = true)]
    enable_lora: bool,
    #[arg(long, hide = true)]
    chat_template: Option<String>,
    #[arg(long, hide = true)]
    speculative_config: Option<String>,
    #[arg(long, hide = true)]
    tokenizer: Option<String>,
    #[arg(long, hide = true)]
    revision: Option<String>,
}

impl ServeArgs {
    /// The `tandem up` this command line means, or the first flag it cannot honour, by name.
    pub fn into_up(self) -> Result<UpArgs> {
        let refused = [
            (self.tensor_parallel_size == 0, "--tensor-parallel-size", "a tensor-parallel group has at least one rank"),
            (self.no_enable_prefix_caching, "--no-enable-prefix-caching", "prefix caching cannot be turned off"),
            (!matches!(self.dtype.as_str(), "auto" | "bfloat16" | "bf16"), "--dtype", "only `auto` and `bfloat16` are available"),
            (self.quantization.is_some(), "--quantization", "a quantized model is given as a .gguf file, whose quantization is used"),
            (self.kv_cache_dtype.is_some(), "--kv-cache-dtype", "the KV cache is kept in the model's type"),
            (self.pipeline_parallel_size.is_some_and(|n| n != 1), "--pipeline-parallel-size", "pipeline parallelism is not available"),
            (self.data_parallel_size.is_some_and(|n| n != 1), "--data-parallel-size", "use --prefill and --decode for more workers"),
            (self.enforce_eager, "--enforce-eager", "CUDA graphs cannot be turned off from here"),
            (self.enable_lora, "--enable-lora", "LoRA adapters are not available"),
            (self.chat_template.is_some(), "--chat-template", "the model's own chat template is used"),
            (self.speculative_config.is_some(), "--speculative-config", "speculative decoding is not available"),
            (self.tokenizer.is_some(), "--tokenizer", "the model's own tokenizer is used"),
            (self.revision.is_some(), "--revision", "give a local folder or file for a revision other than the hub's newest"),
            (
                self.tool_call_parser.as_deref().is_some_and(|p| !matches!(p, "hermes" | "llama3_json")),
                "--tool-call-parser",
                "the gateway reads `hermes` and `llama3_json` tool calls",
            ),
        ];
        if let Some((_, flag, why)) = refused.iter().find(|(bad, ..)| *bad) {
            bail!("{flag} is not supported by `tandem serve`: {why}");
        }
        if let Some(f) = self.engine.gpu_memory_utilization {
            if !(f > 0.0 && f <= 1.0) {
                bail!("--gpu-memory-utilization must be in (0, 1], got {f}");
            }
        }
        Ok(UpArgs {
            port: self.port,
            host: self.host,
            model: self.model.into_iter().collect(),
            router_config: None,
            prefill: Some(self.prefill),
            decode: Some(self.decode),
            aggregated: 0,
            tp: self.tensor_parallel_size,
            prefill_tp: None,
            decode_tp: None,
            kv_cache_mb: crate::serve::DEFAULT_CPU_KV_CACHE_MB,
            handoff_lease_ms: 10_000,
            device: self.device,
            prefill_device: Vec::new(),
            decode_device: Vec::new(),
            aggregated_device: Vec::new(),
            kv_transport: vec![
                tandem_transfer::TransportKind::CudaIpc,
                tandem_transfer::TransportKind::Tcp,
                tandem_transfer::TransportKind::Ucx,
            ],
            redis: None,
            engine: self.engine,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<UpArgs> {
        let w = Wrap::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).map_err(anyhow::Error::from)?;
        w.serve.into_up()
    }

    #[test]
    fn vllm_names_map_onto_the_cluster() {
        let up = parse(&[
            "/models/m.gguf",
            "--port",
            "9000",
            "--served-model-name",
            "m",
            "--max-model-len",
            "4096",
            "--max-num-seqs",
            "32",
            "--max-num-batched-tokens",
            "2048",
            "--gpu-memory-utilization",
            "0.5",
            "--tensor-parallel-size",
            "1",
            "--enable-prefix-caching",
            "--dtype",
            "auto",
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "hermes",
            "--trust-remote-code",
        ])
        .unwrap();
        assert_eq!((up.model.first().map(String::as_str), up.port, up.tp), (Some("/models/m.gguf"), 9000, 1));
        assert_eq!(parse(&["--tensor-parallel-size", "3"]).unwrap().tp, 3, "groups of threads on the CPU");
        assert_eq!(parse(&["--tensor-parallel-size", "2", "--device", "cuda:0"]).unwrap().tp, 2, "groups of GPUs");
        let e = &up.engine;
        assert_eq!(e.served_model_name, ["m"]);
        assert_eq!(
            (e.max_model_len, e.max_num_seqs, e.max_batch_tokens, e.gpu_memory_utilization),
            (Some(4096), Some(32), Some(2048), Some(0.5))
        );
    }

    #[test]
    fn what_is_not_done_is_refused_by_name() {
        for (args, flag) in [
            (&["--tensor-parallel-size", "0"][..], "--tensor-parallel-size"),
            (&["--quantization", "awq"], "--quantization"),
            (&["--dtype", "float16"], "--dtype"),
            (&["--no-enable-prefix-caching"], "--no-enable-prefix-caching"),
            (&["--tool-call-parser", "mistral"], "--tool-call-parser"),
            (&["--enforce-eager"], "--enforce-eager"),
            (&["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        // A flag neither vLLM's known ones nor Tandem's is refused by the parser, by name.
        let e = parse(&["--no-such-flag"]).unwrap_err().to_string();
        assert!(e.contains("--no-such-flag"), "{e}");
    }
}
