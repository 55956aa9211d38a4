//! Every stage kind, listed in one place. Adding a kind is one file and one line here.

use kiln_pipeline::registry::{Kind, ModelTable, Registry};

use crate::card::Card;
use crate::compose::Compose;
use crate::dedup::Dedup;
use crate::evaluate::Evaluate;
use crate::export::Export;
use crate::filters::format::FormatFilter;
use crate::filters::language::LanguageFilter;
use crate::filters::length::LengthFilter;
use crate::generate::Generate;
use crate::judge::Judge;
use crate::load::Load;
use crate::profile::Profile;
use crate::programmatic::Programmatic;
use crate::sql::Sql;
use crate::synthesize::Synthesize;
use crate::trajectories::Trajectories;

/// The registry of all built-in stage kinds.
pub fn registry() -> Registry {
    let models = ModelTable::of::<kiln_llm::ModelConfig>(kiln_llm::ModelConfig::problems);
    Registry::new(vec![
        Kind::of::<Card>(
            "card",
            "the dataset card: Markdown with counts, lengths, the funnel, cost and SVG plots, beside the exports",
        ),
        Kind::of::<Compose>(
            "compose",
            "harder questions: chains of 2 to 5 questions on one table fused step by step by an LLM",
        ),
        Kind::of::<Dedup>(
            "dedup",
            "drops exact and near-duplicate questions (MinHash + LSH over word shingles), keeping one of each group",
        ),
        Kind::of::<Evaluate>(
            "evaluate",
            "a model as the agent on benchmark items (DABench, QRData), R runs each, scored: pass@1 and pass@k",
        ),
        Kind::of::<Export>(
            "export",
            "writes rows to a file training tools read: JSON lines, LLaMA-Factory sharegpt, or RL Parquet",
        ),
        Kind::of::<FormatFilter>(
            "format_filter",
            "keeps trajectories that follow the turn protocol exactly and end in one final answer",
        ),
        Kind::of::<Generate>(
            "generate",
            "one LLM request per input row (n samples), with the reply or its tags as new columns",
        ),
        Kind::of::<Judge>(
            "judge",
            "self-consistency: keeps trajectories whose answers agree (with the gold answer, or per a judge model)",
        ),
        Kind::of::<LanguageFilter>(
            "language_filter",
            "drops trajectories with garbled text or mixed natural languages",
        ),
        Kind::of::<LengthFilter>(
            "length_filter",
            "drops trajectories whose final answer (or turns, or total) is over a token limit",
        ),
        Kind::of::<Load>("load", "rows from JSONL, JSON, CSV or Parquet files, such as questions users bring"),
        Kind::of::<Profile>(
            "profile",
            "one row of metadata per table found in CSV, TSV, XLSX, SQLite, Parquet and JSON files",
        ),
        Kind::of::<Programmatic>(
            "programmatic",
            "offline questions with gold answers computed by SQL on each profiled table's real data",
        ),
        Kind::of::<Sql>("sql", "a DataFusion SQL query over the input stages, each a table named after its stage"),
        Kind::of::<Synthesize>("synthesize", "one LLM-written question per profiled table and sampled task category"),
        Kind::of::<Trajectories>(
            "trajectories",
            "n multi-turn agent trajectories per question, code run in an isolated persistent Python worker",
        ),
    ])
    .with_models(models)
}
