//! The benchmark command: flags to configuration, workload, run or sweep, then summary,
//! result files and plots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{BenchArgs, DatasetName};
use crate::client::discover_model;
use crate::tokens::default_tokenizer_path;
use crate::{dataset, plot, report, sweep};
use crate::{load_tokenizer, run_benchmark, BenchConfig, DatasetSpec, LoadtestError, Result, RunReport, Slo, TokenCounter};

/// Requests prepared for a run bounded only by `--duration`; they are sent again in turn.
const DURATION_POOL: usize = 1000;
const DEFAULT_NUM_PROMPTS: usize = 1000;

pub fn parse_percentiles(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|p| p.trim().parse::<f64>().map_err(|_| LoadtestError::Config(format!("--metric-percentiles: {p:?} is not a number"))))
        .collect()
}

fn dataset_spec(args: &BenchArgs) -> Result<DatasetSpec> {
    Ok(match args.dataset_name {
        DatasetName::Random => DatasetSpec::Random {
            input_len: args.random_input_len,
            output_len: args.random_output_len,
            range_ratio: args.random_range_ratio,
        },
        DatasetName::Sharegpt => DatasetSpec::ShareGpt {
            path: args.dataset_path.clone().ok_or_else(|| LoadtestError::Config("--dataset-name sharegpt needs --dataset-path".into()))?,
            output_len: args.sharegpt_output_len,
        },
        DatasetName::Prefix => DatasetSpec::Prefix {
            prefix_len: args.prefix_len,
            num_prefixes: args.num_prefixes,
            suffix_len: args.suffix_len,
            output_len: args.prefix_repetition_output_len.unwrap_or(args.random_output_len),
            range_ratio: args.random_range_ratio,
        },
    })
}

/// Configuration from flags, the model asked from the target when not named.
pub async fn config(args: &BenchArgs, tokenizer_id: &str, dataset_name: &str) -> Result<BenchConfig> {
    let mut cfg = BenchConfig::new(args.base_url.clone(), args.model.clone().unwrap_or_default());
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
    cfg.goodput = if args.goodput.is_empty() { None } else { Some(Slo::parse(&args.goodput)?) };
    cfg.percentiles = parse_percentiles(&args.metric_percentiles)?;
    cfg.show_progress = !args.disable_tqdm;
    cfg.tokenizer_id = tokenizer_id.to_string();
    cfg.dataset_name = dataset_name.to_string();
    cfg.validate()?;
    if cfg.model.is_empty() {
        cfg.model = discover_model(&cfg).await?;
    }
    Ok(cfg)
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
    let tokenizer_path = args.tokenizer.clone().unwrap_or_else(default_tokenizer_path);
    let counter = Arc::new(TokenCounter::new(load_tokenizer(&tokenizer_path)?)?);
    let spec = dataset_spec(args)?;
    let cfg = config(args, &tokenizer_path.display().to_string(), spec.name()).await?;
    let pool = cfg.num_prompts.unwrap_or(DURATION_POOL);
    let requests = dataset::build(&spec, &counter, pool, cfg.seed)?;
    let mean = |f: &dyn Fn(&crate::SampleRequest) -> usize| requests.iter().map(f).sum::<usize>() as f64 / requests.len() as f64;
    println!(
        "{} requests prepared ({}): mean {:.1} prompt tokens, {:.1} output tokens; target {} model {}",
        requests.len(),
        spec.name(),
        mean(&|r| r.prompt_len),
        mean(&|r| r.output_len),
        cfg.url(&cfg.endpoint),
        cfg.model
    );

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
    print!("{}", report::summary(&report.result, &cfg.percentiles));
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
    fn vllm_prefix_repetition_flags_are_accepted() {
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
        // Our own spellings say the same; the output length then comes from --random-output-len.
        let args = bench(&[
            "--dataset-name",
            "prefix",
            "--prefix-len",
            "300",
            "--suffix-len",
            "20",
            "--num-prefixes",
            "3",
            "--random-output-len",
            "99",
        ]);
        let DatasetSpec::Prefix { prefix_len, num_prefixes, suffix_len, output_len, .. } = dataset_spec(&args).unwrap() else {
            panic!("the prefix workload")
        };
        assert_eq!((prefix_len, suffix_len, num_prefixes, output_len), (300, 20, 3, 99));
    }

    #[test]
    fn label_and_warmups_reach_the_configuration() {
        let args = bench(&["--model", "m", "--label", "nightly", "--num-warmups", "5", "--num-prompts", "3"]);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let cfg = rt.block_on(config(&args, "tok", "random")).unwrap();
        assert_eq!((cfg.label.as_deref(), cfg.num_warmups, cfg.backend.as_str()), (Some("nightly"), 5, "openai"));
        let cfg = rt.block_on(config(&bench(&["--model", "m", "--num-prompts", "3"]), "tok", "random")).unwrap();
        assert_eq!((cfg.label, cfg.num_warmups), (None, 0));
    }
}
