//! The benchmark command: flags to configuration, workload, run or sweep, then summary,
//! result files and plots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tandem_tokenizer::Tokenizer;
use tokio::time::Instant;

use crate::cli::{BenchArgs, DatasetName};
use crate::client::{list_models, ServedModel};
use crate::config::{parse_headers, parse_metrics, request_extras, target_url};
use crate::{dataset, plot, report, sweep, wait_until_ready};
use crate::{resolve_tokenizer, run_benchmark, BenchConfig, DatasetSpec, LoadtestError, Result, RunReport, Slo, TokenCounter};

/// Requests prepared for a run bounded only by `--duration`; they are sent again in turn.
const DURATION_POOL: usize = 1000;
const DEFAULT_NUM_PROMPTS: usize = 1000;
/// How often `GET /v1/models` is asked again while the ready check waits for the target.
const MODELS_RETRY: Duration = Duration::from_secs(1);

pub fn parse_percentiles(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|_| LoadtestError::Config(format!("--metric-percentiles: {p:?} is not a number"))))
        .collect()
}

fn dataset_spec(args: &BenchArgs) -> Result<DatasetSpec> {
    Ok(match args.dataset_name {
        DatasetName::Random => DatasetSpec::Random {
            input_len: args.input_len.unwrap_or(args.random_input_len),
            output_len: args.output_len.unwrap_or(args.random_output_len),
            range_ratio: args.random_range_ratio,
        },
        DatasetName::Sharegpt => DatasetSpec::ShareGpt {
            path: args.dataset_path.clone().ok_or_else(|| LoadtestError::Config("--dataset-name sharegpt needs --dataset-path".into()))?,
            output_len: args.output_len.or(args.sharegpt_output_len),
        },
        DatasetName::PrefixRepetition => DatasetSpec::Prefix {
            prefix_len: args.prefix_repetition_prefix_len,
            num_prefixes: args.prefix_repetition_num_prefixes,
            suffix_len: args.prefix_repetition_suffix_len,
            output_len: args.output_len.unwrap_or(args.prefix_repetition_output_len),
            range_ratio: args.random_range_ratio,
        },
    })
}

/// `ignore_eos` is sent with `--ignore-eos`, and always for the random dataset, whose output
/// lengths are the workload (`vllm bench serve` sets it there too).
pub fn ignore_eos(args: &BenchArgs) -> bool {
    args.ignore_eos || args.dataset_name == DatasetName::Random
}

/// Configuration from flags. The model is left empty when not named; `run` asks the target.
pub fn config(args: &BenchArgs) -> Result<BenchConfig> {
    let base_url = target_url(args.base_url.as_deref(), &args.host, args.port);
    let mut cfg = BenchConfig::new(base_url, args.model.clone().unwrap_or_default());
    cfg.endpoint = args.endpoint.clone();
    cfg.backend = args.backend.clone().unwrap_or_else(|| if cfg.is_chat() { "openai-chat" } else { "openai" }.into());
    cfg.label = args.label.clone();
    cfg.num_warmups = args.num_warmups;
    cfg.request_rate = args.request_rate;
    cfg.burstiness = args.burstiness;
    cfg.max_concurrency = args.max_concurrency;
    cfg.duration = match args.duration {
        Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
        Some(_) => return Err(LoadtestError::Config("--duration must be a positive number of seconds".into())),
        None => None,
    };
    cfg.num_prompts = args.num_prompts.or(if cfg.duration.is_some() { None } else { Some(DEFAULT_NUM_PROMPTS) });
    cfg.seed = args.seed;
    if !(args.request_timeout.is_finite() && args.request_timeout > 0.0) {
        return Err(LoadtestError::Config("--request-timeout must be a positive number of seconds".into()));
    }
    cfg.request_timeout = Duration::from_secs_f64(args.request_timeout);
    cfg.ready_check_timeout = Duration::from_secs(args.ready_check_timeout_sec);
    cfg.headers = parse_headers(&args.header)?;
    cfg.insecure = args.insecure;
    cfg.ignore_eos = ignore_eos(args);
    let sampling = [
        ("top_p", args.top_p.map(|v| json!(v))),
        ("top_k", args.top_k.map(|v| json!(v))),
        ("min_p", args.min_p.map(|v| json!(v))),
        ("temperature", args.temperature.map(|v| json!(v))),
        ("frequency_penalty", args.frequency_penalty.map(|v| json!(v))),
        ("presence_penalty", args.presence_penalty.map(|v| json!(v))),
        ("repetition_penalty", args.repetition_penalty.map(|v| json!(v))),
    ];
    cfg.extra_body = request_extras(&sampling, args.extra_body.as_deref())?;
    cfg.goodput = if args.goodput.is_empty() { None } else { Some(Slo::parse(&args.goodput)?) };
    cfg.percentile_metrics = parse_metrics(&args.percentile_metrics)?;
    cfg.percentiles = parse_percentiles(&args.metric_percentiles)?;
    cfg.save_detailed = args.save_detailed;
    cfg.show_progress = !args.disable_tqdm;
    cfg.dataset_name = dataset_spec(args)?.name().to_string();
    cfg.validate()?;
    Ok(cfg)
}

/// `GET /v1/models`, asked again until `deadline` while it fails (once when it has passed).
async fn models_by(cfg: &BenchConfig, deadline: Instant) -> Result<Vec<ServedModel>> {
    loop {
        let err = match list_models(cfg).await {
            Ok(models) => return Ok(models),
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(err);
        }
        tokio::time::sleep(left.min(MODELS_RETRY)).await;
    }
}

/// Loads a tokenizer off the runtime's threads: a hub id may be downloaded.
async fn load(spec: &str) -> Result<Tokenizer> {
    let spec = spec.to_string();
    tokio::task::spawn_blocking(move || resolve_tokenizer(&spec)).await.expect("loading a tokenizer does not panic")
}

/// The served model's tokenizer, as `vllm bench serve` finds it without `--tokenizer`: from
/// `--model` when that names one, else from the served model's `root` (its path or hub id) or
/// `id` in `GET /v1/models`. Returns it with the name it was loaded from.
async fn served_tokenizer(
    cfg: &BenchConfig,
    named_model: Option<&str>,
    listed: Option<Vec<ServedModel>>,
    deadline: Instant,
) -> Result<(Tokenizer, String)> {
    let mut tried: Vec<(String, String)> = Vec::new();
    if let Some(model) = named_model {
        match load(model).await {
            Ok(t) => return Ok((t, model.to_string())),
            Err(e) => tried.push((model.to_string(), e.to_string())),
        }
    }
    let listed = match listed {
        Some(models) => Ok(models),
        None => models_by(cfg, deadline).await,
    };
    match listed {
        Ok(models) => {
            let served = models.iter().find(|m| m.id == cfg.model).unwrap_or(&models[0]);
            for spec in served.root.iter().chain([&served.id]) {
                if tried.iter().any(|(s, _)| s == spec) {
                    continue;
                }
                match load(spec).await {
                    Ok(t) => return Ok((t, spec.clone())),
                    Err(e) => tried.push((spec.clone(), e.to_string())),
                }
            }
        }
        Err(e) => tried.push(("GET /v1/models".into(), e.to_string())),
    }
    let tried: Vec<String> = tried.into_iter().map(|(spec, e)| format!("{spec}: {e}")).collect();
    Err(LoadtestError::Config(format!(
        "no tokenizer found for the served model {:?} ({}); pass --tokenizer with a .gguf file, a tokenizer.json, a model folder or a hub id",
        cfg.model,
        tried.join("; ")
    )))
}

fn result_path(args: &BenchArgs, report: &RunReport, sweep_rate: Option<f64>) -> PathBuf {
    let dir = args.result_dir.clone().unwrap_or_default();
    let name = match (&args.result_filename, sweep_rate) {
        (Some(name), None) => name.clone(),
        (Some(name), Some(rate)) => {
            let stem = Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or(name);
            format!("{stem}-rate{}.json", rate_label(rate))
        }
        (None, _) => report.result.default_filename(),
    };
    dir.join(name)
}

fn rate_label(rate: f64) -> String {
    if rate.is_finite() {
        format!("{rate}")
    } else {
        "inf".into()
    }
}

/// Runs the benchmark the flags describe, printing to stdout.
pub async fn run(args: &BenchArgs) -> Result<()> {
    let mut cfg = config(args)?;
    let spec = dataset_spec(args)?;
    // The ready check waits for the target in two steps on one clock: for `GET /v1/models`
    // when the model or its tokenizer is asked from it, then for a first request.
    let deadline = Instant::now() + cfg.ready_check_timeout;
    if !cfg.ready_check_timeout.is_zero() {
        println!("Waiting up to {} s for {} to serve requests", cfg.ready_check_timeout.as_secs(), cfg.base_url);
    }
    let mut listed = None;
    if cfg.model.is_empty() {
        let models = models_by(&cfg, deadline).await.map_err(|e| match e {
            LoadtestError::Target(m) => LoadtestError::Target(format!("{m} (pass --model)")),
            other => other,
        })?;
        cfg.model = models[0].id.clone();
        listed = Some(models);
    }
    let (tokenizer, tokenizer_id) = match &args.tokenizer {
        Some(spec) => (load(spec).await?, spec.clone()),
        None => served_tokenizer(&cfg, args.model.as_deref(), listed, deadline).await?,
    };
    cfg.tokenizer_id = tokenizer_id;
    let counter = Arc::new(TokenCounter::new(tokenizer)?);
    let pool = cfg.num_prompts.unwrap_or(DURATION_POOL);
    let requests = dataset::build(&spec, &counter, pool, cfg.seed)?;
    let mean = |f: &dyn Fn(&crate::SampleRequest) -> usize| requests.iter().map(f).sum::<usize>() as f64 / requests.len() as f64;
    println!(
        "{} requests prepared ({}): mean {:.1} prompt tokens, {:.1} output tokens; target {} model {}; tokenizer {}",
        requests.len(),
        spec.name(),
        mean(&|r| r.prompt_len),
        mean(&|r| r.output_len),
        cfg.url(&cfg.endpoint),
        cfg.model,
        cfg.tokenizer_id
    );
    if !cfg.ready_check_timeout.is_zero() {
        let left = deadline.saturating_duration_since(Instant::now());
        wait_until_ready(&cfg, &requests[0], counter.clone(), left).await?;
        println!("Initial test run completed.");
    }

    let sweep_rates = args.sweep.as_deref().map(sweep::parse_rates).transpose()?;
    let Some(rates) = sweep_rates else {
        let report = run_benchmark(&cfg, &requests, counter).await?;
        finish_run(args, &cfg, &report, None)?;
        return Ok(());
    };
    // Rate i draws its prompts with seed + i (the first rate's are the ones prepared above).
    let mut first = Some(requests);
    let per_rate = |i: usize| match (i, first.take()) {
        (0, Some(prepared)) => Ok(prepared),
        _ => dataset::build(&spec, &counter, pool, cfg.seed.wrapping_add(i as u64)),
    };
    let reports = sweep::sweep(&cfg, &rates, per_rate, counter.clone(), |report| {
        println!("request rate {}", rate_label(report.result.info.request_rate));
        finish_run(args, &cfg, report, Some(report.result.info.request_rate))
    })
    .await?;
    let results: Vec<_> = reports.into_iter().map(|r| r.result).collect();
    println!("{}", sweep::table(&results));
    if let Some(dir) = &args.plot_dir {
        for path in plot::sweep_plots(dir, &results)? {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

fn finish_run(args: &BenchArgs, cfg: &BenchConfig, report: &RunReport, sweep_rate: Option<f64>) -> Result<()> {
    print!("{}", report::summary(&report.result, &cfg.percentile_metrics, &cfg.percentiles));
    if args.save_result {
        let path = result_path(args, report, sweep_rate);
        report.result.save(&path)?;
        println!("result: {}", path.display());
    }
    if let Some(dir) = &args.plot_dir {
        let prefix = sweep_rate.map(|r| format!("rate{}_", rate_label(r))).unwrap_or_default();
        for path in plot::latency_cdfs(dir, &prefix, &report.outcomes)? {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn bench(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("tandem-loadtest").chain(args.iter().copied())).unwrap().bench
    }

    #[test]
    fn vllm_prefix_repetition_flags_and_defaults() {
        let args = bench(&[
            "--dataset-name",
            "prefix_repetition",
            "--prefix-repetition-prefix-len",
            "300",
            "--prefix-repetition-suffix-len",
            "20",
            "--prefix-repetition-num-prefixes",
            "3",
            "--prefix-repetition-output-len",
            "7",
            "--random-output-len",
            "99",
        ]);
        let DatasetSpec::Prefix { prefix_len, num_prefixes, suffix_len, output_len, .. } = dataset_spec(&args).unwrap() else {
            panic!("prefix_repetition is the prefix workload")
        };
        assert_eq!((prefix_len, suffix_len, num_prefixes, output_len), (300, 20, 3, 7));
        // vLLM's defaults: 10 prefixes of 256 tokens, suffixes of 256, 128 output tokens; the
        // older name `prefix` and the short flag names still work.
        let args = bench(&["--dataset-name", "prefix", "--random-output-len", "99"]);
        let DatasetSpec::Prefix { prefix_len, num_prefixes, suffix_len, output_len, .. } = dataset_spec(&args).unwrap() else {
            panic!("the prefix workload")
        };
        assert_eq!((prefix_len, suffix_len, num_prefixes, output_len), (256, 256, 10, 128));
        assert_eq!(dataset_spec(&args).unwrap().name(), "prefix_repetition");
        let args = bench(&["--dataset-name", "prefix", "--prefix-len", "30", "--suffix-len", "2", "--num-prefixes", "4"]);
        let DatasetSpec::Prefix { prefix_len, num_prefixes, suffix_len, .. } = dataset_spec(&args).unwrap() else { panic!() };
        assert_eq!((prefix_len, suffix_len, num_prefixes), (30, 2, 4));
        // --output-len sets every dataset's output length, --input-len the random prompt's.
        let args = bench(&["--dataset-name", "prefix_repetition", "--output-len", "5"]);
        assert!(matches!(dataset_spec(&args).unwrap(), DatasetSpec::Prefix { output_len: 5, .. }));
        let args = bench(&["--input-len", "64", "--output-len", "5", "--random-input-len", "9"]);
        assert!(matches!(dataset_spec(&args).unwrap(), DatasetSpec::Random { input_len: 64, output_len: 5, .. }));
    }

    #[test]
    fn label_and_warmups_reach_the_configuration() {
        let args = bench(&["--model", "m", "--label", "nightly", "--num-warmups", "5", "--num-prompts", "3"]);
        let cfg = config(&args).unwrap();
        assert_eq!((cfg.label.as_deref(), cfg.num_warmups, cfg.backend.as_str()), (Some("nightly"), 5, "openai"));
        let cfg = config(&bench(&["--model", "m", "--num-prompts", "3"])).unwrap();
        assert_eq!((cfg.label, cfg.num_warmups), (None, 0));
    }

    #[test]
    fn vllm_defaults() {
        let cfg = config(&bench(&["--dataset-name", "sharegpt", "--dataset-path", "x.json"])).unwrap();
        assert_eq!(cfg.base_url, "http://127.0.0.1:8000");
        assert_eq!(cfg.percentile_metrics, vec!["ttft", "tpot", "itl"]);
        assert_eq!(cfg.percentiles, vec![99.0]);
        assert_eq!(cfg.num_prompts, Some(1000));
        assert!(!cfg.ignore_eos, "ignore_eos only when asked for");
        assert!(cfg.extra_body.is_empty(), "no sampling parameter unless given");
        assert!(cfg.headers.is_empty() && !cfg.save_detailed && !cfg.insecure);
        assert_eq!(cfg.ready_check_timeout, Duration::ZERO);
        // The random dataset always ignores EOS, as in vLLM.
        assert!(config(&bench(&[])).unwrap().ignore_eos);
        assert!(config(&bench(&["--dataset-name", "prefix_repetition", "--ignore-eos"])).unwrap().ignore_eos);
        assert!(!config(&bench(&["--dataset-name", "prefix_repetition"])).unwrap().ignore_eos);
    }

    #[test]
    fn target_flags() {
        assert_eq!(config(&bench(&["--host", "10.1.2.3", "--port", "9001"])).unwrap().base_url, "http://10.1.2.3:9001");
        let cfg = config(&bench(&["--host", "10.1.2.3", "--base-url", "https://api.example.com", "--insecure"])).unwrap();
        assert_eq!(cfg.base_url, "https://api.example.com");
        assert!(cfg.insecure);
        let cfg = config(&bench(&["--header", "x-a=1", "x-b=2", "--header", "Authorization=Bearer k", "--ready-check-timeout-sec", "30"]))
            .unwrap();
        let h = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(cfg.headers, vec![h("x-a", "1"), h("x-b", "2"), h("Authorization", "Bearer k")]);
        assert_eq!(cfg.ready_check_timeout, Duration::from_secs(30));
        assert!(config(&bench(&["--header", "novalue"])).is_err());
    }

    #[test]
    fn sampling_flags_and_extra_body_build_the_request_extras() {
        let cfg =
            config(&bench(&["--temperature", "0", "--top-p", "0.9", "--top-k", "-1", "--extra-body", r#"{"top_p": 0.5, "seed": 3}"#]))
                .unwrap();
        assert_eq!(serde_json::Value::Object(cfg.extra_body), json!({"temperature": 0.0, "top_p": 0.5, "top_k": -1, "seed": 3}));
        assert!(config(&bench(&["--extra-body", "not json"])).is_err());
        assert!(config(&bench(&["--extra-body", "[]"])).is_err());
    }

    #[test]
    fn percentile_flags() {
        let cfg = config(&bench(&["--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90,99.9"])).unwrap();
        assert_eq!(cfg.percentile_metrics, vec!["ttft", "e2el"]);
        assert_eq!(cfg.percentiles, vec![50.0, 90.0, 99.9]);
        assert!(config(&bench(&["--percentile-metrics", "ttft,queue"])).is_err());
        assert!(config(&bench(&["--metric-percentiles", "101"])).is_err());
    }
}
