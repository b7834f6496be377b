//! Command-line flags, named as `vllm bench serve` names them where the concept is the same.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-loadtest",
    version,
    about = "Benchmark an OpenAI-compatible endpoint: latency per token, throughput, goodput",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print two result files side by side with the ratio B/A of every number.
    Compare { a: PathBuf, b: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    Random,
    Sharegpt,
    /// vLLM calls it `prefix_repetition`.
    #[value(alias = "prefix_repetition")]
    Prefix,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Target, scheme://host:port (a trailing /v1 is accepted).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model name sent in requests; asked from GET /v1/models when absent.
    #[arg(long)]
    pub model: Option<String>,
    /// Backend named in the result file; openai or openai-chat by endpoint when absent.
    #[arg(long)]
    pub backend: Option<String>,
    /// Label of the result (and its file name's prefix); the backend when absent.
    #[arg(long)]
    pub label: Option<String>,
    /// A .gguf file, a tokenizer.json or a model folder [default: the default Tandem model].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    /// ShareGPT-format JSON file (--dataset-name sharegpt).
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Prompt tokens (random); suffix tokens are --suffix-len (prefix).
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens (random; prefix unless --prefix-repetition-output-len).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from len * [1 - ratio, 1 + ratio].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Tokens of each shared prefix (prefix).
    #[arg(long, visible_alias = "prefix-repetition-prefix-len", default_value_t = 512)]
    pub prefix_len: usize,
    /// Distinct shared prefixes (prefix).
    #[arg(long, visible_alias = "prefix-repetition-num-prefixes", default_value_t = 8)]
    pub num_prefixes: usize,
    /// Random tokens after the prefix (prefix).
    #[arg(long, visible_alias = "prefix-repetition-suffix-len", default_value_t = 32)]
    pub suffix_len: usize,
    /// Output tokens (prefix) [default: --random-output-len].
    #[arg(long)]
    pub prefix_repetition_output_len: Option<usize>,
    /// Output tokens of every request instead of the gpt turn's length (sharegpt).
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    /// Requests to send [default: 1000, or unbounded with --duration].
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Requests sent before the timed run (all at once, under --max-concurrency) and not counted.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Requests per second, or inf to send all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more even.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// At most this many requests in flight.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Stop sending after this many seconds (in-flight requests finish).
    #[arg(long)]
    pub duration: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds one request may take, connect to [DONE].
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000 (milliseconds).
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Percentiles to report, comma-separated.
    #[arg(long, default_value = "90,99")]
    pub metric_percentiles: String,
    /// Write the result JSON.
    #[arg(long)]
    pub save_result: bool,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    /// File name of the result [default: {backend}-{rate}qps-{model}-{date}.json].
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Run once per rate, e.g. 1,2,4,8; plots throughput and goodput against rate.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Write SVG plots here: latency CDFs, and throughput vs rate for a sweep.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
}
