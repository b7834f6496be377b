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
    /// Shared prefixes and random suffixes; `prefix` is the older name.
    #[value(name = "prefix_repetition", alias = "prefix")]
    PrefixRepetition,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Target, scheme://host[:port] (a trailing /v1 is accepted); http://HOST:PORT when absent.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Host of the target when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the target when --base-url is not given.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Extra request header, KEY=VALUE; repeatable, several may follow one --header.
    #[arg(long, value_name = "KEY=VALUE", num_args = 1..)]
    pub header: Vec<String>,
    /// Accept any TLS certificate of an https:// target (self-signed test servers).
    #[arg(long)]
    pub insecure: bool,
    /// Model name sent in requests; asked from GET /v1/models when absent.
    #[arg(long)]
    pub model: Option<String>,
    /// Backend named in the result file; openai or openai-chat by endpoint when absent.
    #[arg(long)]
    pub backend: Option<String>,
    /// Label of the result (and its file name's prefix); the backend when absent.
    #[arg(long)]
    pub label: Option<String>,
    /// A .gguf file, a tokenizer.json, a model folder or a Hugging Face hub id [default: the
    /// served model, as GET /v1/models names it].
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    /// ShareGPT-format JSON file (--dataset-name sharegpt).
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Prompt tokens of every dataset that has such a length (sets --random-input-len).
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Output tokens of every dataset (sets --random-output-len, --sharegpt-output-len and
    /// --prefix-repetition-output-len).
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Prompt tokens (random).
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Output tokens (random).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from len * [1 - ratio, 1 + ratio].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Tokens of each shared prefix (prefix_repetition).
    #[arg(long, visible_alias = "prefix-len", default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// Random tokens after the prefix (prefix_repetition).
    #[arg(long, visible_alias = "suffix-len", default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// Distinct shared prefixes (prefix_repetition).
    #[arg(long, visible_alias = "num-prefixes", default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// Output tokens (prefix_repetition).
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
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
    /// Seconds to wait for the target to serve the workload's first request before the run;
    /// 0 starts at once.
    #[arg(long, default_value_t = 0)]
    pub ready_check_timeout_sec: u64,
    /// Send ignore_eos, so every request generates its full output length (always on for
    /// --dataset-name random).
    #[arg(long)]
    pub ignore_eos: bool,
    /// `temperature` of every request; the server's default when absent.
    #[arg(long, help_heading = "Sampling parameters")]
    pub temperature: Option<f64>,
    /// `top_p` of every request.
    #[arg(long, help_heading = "Sampling parameters")]
    pub top_p: Option<f64>,
    /// `top_k` of every request.
    #[arg(long, help_heading = "Sampling parameters", allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// `min_p` of every request.
    #[arg(long, help_heading = "Sampling parameters")]
    pub min_p: Option<f64>,
    /// `frequency_penalty` of every request.
    #[arg(long, help_heading = "Sampling parameters", allow_negative_numbers = true)]
    pub frequency_penalty: Option<f64>,
    /// `presence_penalty` of every request.
    #[arg(long, help_heading = "Sampling parameters", allow_negative_numbers = true)]
    pub presence_penalty: Option<f64>,
    /// `repetition_penalty` of every request.
    #[arg(long, help_heading = "Sampling parameters")]
    pub repetition_penalty: Option<f64>,
    /// A JSON object merged into every request body (its fields win), e.g.
    /// '{"chat_template_kwargs": {"enable_thinking": false}}'.
    #[arg(long, value_name = "JSON")]
    pub extra_body: Option<String>,
    /// SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000 (milliseconds).
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Metrics whose statistics are reported, comma-separated: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Percentiles to report for each of --percentile-metrics, comma-separated.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// Write the result JSON.
    #[arg(long)]
    pub save_result: bool,
    /// Also write the per-request lists (input_lens, output_lens, start_times, ttfts, itls,
    /// generated_texts, errors) to the result.
    #[arg(long)]
    pub save_detailed: bool,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    /// File name of the result [default: {label}-{rate}qps[-concurrency{n}]-{model}-{date}.json].
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
