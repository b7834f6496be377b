//! The `tandem` command line: one binary for local generation and for running the services.
#![forbid(unsafe_code)]

mod bench;
pub use tandem_tokenizer::default_model;
mod generate;
mod serve;
mod transports;
mod up;
mod vllm_serve;

use clap::{Parser, Subcommand};

pub use generate::GenerateArgs;

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Disaggregated LLM serving")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` or as `json`, one object per line with the request's span fields
    /// (`request_id`, `trace_id`) at the top level; `tandem up` passes it to every service.
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", default_value = "text")]
    pub log_format: tandem_runtime::LogFormat,
    /// Threads of a service's async runtime (gRPC and HTTP servers, KV receivers, streams); the
    /// engine has a thread of its own beside them. Default: one per core this process may use.
    #[arg(long, global = true, env = "TANDEM_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    #[command(flatten)]
    pub traces: TraceArgs,
}

/// Where spans go and which are kept, by the OpenTelemetry environment variables (each with a
/// flag); `tandem up` passes them to every service.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// Send spans over OTLP to this collector (Jaeger v2 takes OTLP directly), for example
    /// http://localhost:4317. Unset: no exporter.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` (port 4317) or `http/protobuf` (port 4318).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: tandem_runtime::telemetry::OtlpProtocol,
    /// The service name spans carry, instead of the role's own (`tandem-gateway`, `tandem-prefill`,
    /// `tandem-decode`, `tandem-kv-store`). `tandem up` keeps each role's name.
    #[arg(long, global = true, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
    /// `parentbased_always_on` (default), `parentbased_traceidratio`, `traceidratio`,
    /// `always_on`, `always_off`, `parentbased_always_off`.
    #[arg(long, global = true, env = "OTEL_TRACES_SAMPLER")]
    pub traces_sampler: Option<String>,
    /// The ratio of the `traceidratio` samplers, between 0 and 1.
    #[arg(long, global = true, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub traces_sampler_arg: Option<String>,
    /// More resource attributes for every span, as `key=value,key=value`.
    #[arg(long, global = true, env = "OTEL_RESOURCE_ATTRIBUTES")]
    pub otel_resource_attributes: Option<String>,
}

impl TraceArgs {
    pub fn config(&self) -> tandem_runtime::telemetry::TraceConfig {
        tandem_runtime::telemetry::TraceConfig {
            endpoint: self.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()),
            protocol: self.otlp_protocol,
            service_name: self.otel_service_name.clone(),
            sampler: self.traces_sampler.clone(),
            sampler_arg: self.traces_sampler_arg.clone(),
            resource_attributes: self.otel_resource_attributes.clone(),
        }
    }

    /// Hands the settings to `tandem up`'s children through their environment (each service
    /// keeps its own name).
    fn pass_on(&self) {
        let set = |k: &str, v: &Option<String>| match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        };
        set("OTEL_EXPORTER_OTLP_ENDPOINT", &self.otlp_endpoint);
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", self.otlp_protocol.to_string());
        set("OTEL_TRACES_SAMPLER", &self.traces_sampler);
        set("OTEL_TRACES_SAMPLER_ARG", &self.traces_sampler_arg);
        set("OTEL_RESOURCE_ATTRIBUTES", &self.otel_resource_attributes);
        std::env::remove_var("OTEL_SERVICE_NAME");
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt on the CPU engine and print it.
    Generate(GenerateArgs),
    /// Fetch the default model (if missing) and print its path.
    FetchModel,
    /// Fetch a model from the Hugging Face hub into its cache (`HF_HOME`, `HF_ENDPOINT` and
    /// `HF_TOKEN` apply), with a progress bar on a terminal, and print where it is; a local file
    /// or folder is only checked.
    Download {
        /// A hub id (`org/name`), a .gguf file, a model folder, or the default model's name.
        model: String,
    },
    /// Run the whole disaggregated cluster on this machine: gateway, prefill and decode workers
    /// and the KV store, each its own process.
    Up(up::UpArgs),
    /// `tandem up` from a `vllm serve` command line: `tandem serve MODEL --port 8000
    /// --max-model-len 4096 ...` (vLLM's flags that name something Tandem does not do are
    /// refused by name).
    Serve(vllm_serve::ServeArgs),
    /// Run the OpenAI-compatible HTTP gateway.
    Gateway(serve::GatewayArgs),
    /// Run a prefill worker.
    Prefill(serve::PrefillArgs),
    /// Run a decode worker.
    Decode(serve::DecodeArgs),
    /// Run an aggregated worker: prefill and decode in one engine, chunked prefill mixed into
    /// the decode batches (a decode worker with `--aggregated`).
    Worker(serve::DecodeArgs),
    /// Run the KV block store.
    KvTransfer(serve::KvTransferArgs),
    /// Measure parts of Tandem on this machine.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

impl Cli {
    /// Parses the process's arguments. Every flag that names no environment variable of its own
    /// reads `TANDEM_<FLAG>` (`--heartbeat-ms` from `TANDEM_HEARTBEAT_MS`); a flag on the command
    /// line wins over its variable.
    pub fn parse_args() -> Self {
        Self::parse_from_env_and(std::env::args_os())
    }

    /// As [`Cli::parse_args`], with these arguments (the first is the program's name).
    pub fn parse_from_env_and<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let matches = with_env(Self::command()).get_matches_from(args);
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// Interactive commands stay quiet unless asked; services log progress.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Generate(_) | Command::FetchModel | Command::Download { .. } | Command::Bench(_) => "warn",
            Command::Up(_) | Command::Serve(_) => "warn",
            _ => "info",
        }
    }
}

/// Logs go to stderr, so stdout carries only a command's output; spans go to the OTLP collector
/// when one is configured (see [`tandem_runtime::telemetry`]). Fails on a malformed setting.
pub fn init_telemetry(cli: &Cli) -> anyhow::Result<()> {
    tandem_runtime::telemetry::init(cli.default_log_level(), cli.log_format, cli.traces.config()).map_err(anyhow::Error::msg)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = cli.worker_threads.map_or_else(service_threads, usize::from);
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::FetchModel => {
            println!("{}", default_model::ensure_default()?.display());
            Ok(())
        }
        Command::Download { model } => {
            let spec = default_model::resolve_spec(Some(&model))?;
            let files = tandem_tokenizer::ModelFiles::resolve(&spec)?;
            let path = match &files.format {
                tandem_tokenizer::ModelFormat::Gguf(p) | tandem_tokenizer::ModelFormat::Folder(p) => p,
            };
            println!("{}", path.display());
            Ok(())
        }
        Command::Up(args) => up_cluster(&cli.traces, cli.log_format, cli.worker_threads, args),
        Command::Serve(args) => {
            if !args.api_keys.is_empty() {
                // To the gateway through its environment, not its command line (which any
                // local user can read), before any thread runs.
                std::env::set_var("TANDEM_API_KEYS", args.api_keys.join(","));
            }
            let up = args.into_up()?;
            up_cluster(&cli.traces, cli.log_format, cli.worker_threads, up)
        }
        Command::Gateway(args) => serve_on(threads, serve::gateway(args)),
        Command::Prefill(args) => serve_on(threads, serve::prefill(args)),
        Command::Decode(args) => serve_on(threads, serve::decode(args)),
        Command::Worker(args) => serve_on(threads, serve::decode(serve::DecodeArgs { aggregated: true, ..args })),
        Command::KvTransfer(args) => serve_on(cli.worker_threads.map_or_else(store_threads, usize::from), serve::kv_transfer(args)),
        Command::Bench(cmd) => bench::run(cmd),
    }
}

/// `tandem up`: the services inherit the log format, trace settings and thread count through
/// the environment (set before any thread runs).
fn up_cluster(
    traces: &TraceArgs,
    log_format: tandem_runtime::LogFormat,
    worker_threads: Option<u16>,
    args: up::UpArgs,
) -> anyhow::Result<()> {
    std::env::set_var("TANDEM_LOG_FORMAT", log_format.to_string());
    traces.pass_on();
    if let Some(n) = worker_threads {
        std::env::set_var("TANDEM_WORKER_THREADS", n.to_string());
    }
    // Only supervises its children: two threads are plenty.
    runtime(2)?.block_on(up::run(args))
}

/// Runs a service to its end, then leaves without waiting on blocking threads that never end by
/// themselves: a managed service reads its stdin on one, so a service that fails to start
/// (a model that does not load) would otherwise hang instead of exiting with its error.
fn serve_on(threads: usize, service: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let rt = runtime(threads)?;
    let result = rt.block_on(service);
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
}

/// A service's runtime threads by default: one per core this process may use (at least two, so
/// a blocking moment on one never stalls the others).
fn service_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

/// The block store's: as a service's, at most eight (puts scale no further, see `tandem bench
/// store`).
pub(crate) fn store_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Gives every flag of `cmd` and its subcommands that has none an environment variable,
/// `TANDEM_` and its name (hidden flags, which only `tandem up` passes, excepted).
fn with_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if a.get_env().is_some() || a.is_positional() || a.is_hide_set() {
            return a;
        }
        let name = format!("TANDEM_{}", a.get_id().as_str().to_uppercase().replace('-', "_"));
        a.env(name)
    })
    .mut_subcommands(with_env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_flag_reads_its_environment_variable_and_the_command_line_wins() {
        // A variable no other test sets, for a flag that names none itself.
        std::env::set_var("TANDEM_HEARTBEAT_MS", "1234");
        let heartbeat = |cli: Cli| match cli.command {
            Command::Prefill(p) => p.common.heartbeat_ms,
            other => panic!("{other:?}"),
        };
        assert_eq!(heartbeat(Cli::parse_from_env_and(["tandem", "prefill"])), 1234);
        assert_eq!(heartbeat(Cli::parse_from_env_and(["tandem", "prefill", "--heartbeat-ms", "77"])), 77);
        std::env::remove_var("TANDEM_HEARTBEAT_MS");
        assert_eq!(heartbeat(Cli::parse_from_env_and(["tandem", "prefill"])), 1000);
        // The transports are a closed set: a typo is refused, not ignored.
        let err = with_env(Cli::command()).try_get_matches_from(["tandem", "decode", "--kv-transport", "ucx,tpc"]).unwrap_err();
        assert!(err.to_string().contains("tpc"), "{err}");
    }
}
