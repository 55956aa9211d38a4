//! The kiln engine: TOML pipeline specs, the stage DAG, fingerprints and caches, the dataset store
//! and the executor.
//!
//! The key decision: every stage writes one immutable, fingerprinted dataset (Parquet parts and a
//! manifest written last), and every expensive row goes through a SQLite row cache. A rerun does
//! only what changed, and a killed run loses nothing already paid for.
//!
//! ```no_run
//! # async fn demo(registry: kiln_pipeline::registry::Registry) -> kiln_pipeline::Result<()> {
//! let plan = kiln_pipeline::plan::Plan::load("recipes/quickstart.toml".as_ref(), &registry).await?;
//! let report = kiln_pipeline::executor::run(std::sync::Arc::new(plan), &Default::default()).await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod budget;
pub mod cache;
pub mod error;
pub mod executor;
pub mod fingerprint;
pub mod graph;
pub mod plan;
pub mod progress;
pub mod registry;
pub mod rows;
pub mod spec;
pub mod stage;
pub mod store;

pub use error::{Error, Result};
