//! The stage kinds of kiln. Each kind is one module whose parameters struct implements
//! [`kiln_pipeline::stage::Config`], which builds the [`kiln_pipeline::stage::Stage`] that runs;
//! [`registry::registry`] lists them all.
#![deny(missing_docs)]

pub mod agent;
pub mod benchmarks;
pub mod card;
pub mod compose;
pub mod dedup;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod families;
pub mod filters;
pub mod generate;
pub mod graders;
pub mod grouped;
pub mod judge;
pub mod llm_rows;
pub mod load;
pub mod paths;
pub mod profile;
pub mod programmatic;
pub mod registry;
pub mod reorder;
pub mod sql;
pub mod synthesize;
pub mod taxonomy;
pub mod templates;
pub mod trajectories;

pub use error::StageError;
pub use registry::registry;
