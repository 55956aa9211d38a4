//! The task taxonomy: the 18 categories of RECIPE section 2, one TOML file each under
//! `taxonomy/` (id, name, weight, definition, question templates, 4-6 examples, and the
//! procedural-knowledge workflow used when sampling trajectories).
//!
//! The repository's `taxonomy/` is compiled into kiln, so the binary works anywhere; a pipeline
//! may point at its own folder with `[pipeline] taxonomy = "my_taxonomy"`. Either way the files'
//! contents are part of the fingerprint of every stage that reads them.

use std::path::Path;

use crate::StageError;

use kiln_pipeline::stage::FileDep;
use serde::{Deserialize, Serialize};

/// The built-in category files, as `(file name, contents)`.
const BUILTIN: &[(&str, &str)] = &[
    ("aggregation.toml", include_str!("../../taxonomy/aggregation.toml")),
    ("ranking.toml", include_str!("../../taxonomy/ranking.toml")),
    ("counting.toml", include_str!("../../taxonomy/counting.toml")),
    ("comparison.toml", include_str!("../../taxonomy/comparison.toml")),
    ("domain_specific.toml", include_str!("../../taxonomy/domain_specific.toml")),
    ("causal_analysis.toml", include_str!("../../taxonomy/causal_analysis.toml")),
    ("statistical_analysis.toml", include_str!("../../taxonomy/statistical_analysis.toml")),
    ("correlation_analysis.toml", include_str!("../../taxonomy/correlation_analysis.toml")),
    ("arithmetic_calculation.toml", include_str!("../../taxonomy/arithmetic_calculation.toml")),
    ("descriptive_analysis.toml", include_str!("../../taxonomy/descriptive_analysis.toml")),
    ("impact_analysis.toml", include_str!("../../taxonomy/impact_analysis.toml")),
    ("fact_checking.toml", include_str!("../../taxonomy/fact_checking.toml")),
    ("anomaly_detection.toml", include_str!("../../taxonomy/anomaly_detection.toml")),
    ("multi_hop_numerical_reasoning.toml", include_str!("../../taxonomy/multi_hop_numerical_reasoning.toml")),
    ("time_based_calculation.toml", include_str!("../../taxonomy/time_based_calculation.toml")),
    ("distribution_analysis.toml", include_str!("../../taxonomy/distribution_analysis.toml")),
    ("feature_engineering.toml", include_str!("../../taxonomy/feature_engineering.toml")),
    ("comprehensive_data_preprocessing.toml", include_str!("../../taxonomy/comprehensive_data_preprocessing.toml")),
];

/// One task category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    /// Identifier, equal to the file stem (`multi_hop_numerical_reasoning`).
    pub id: String,
    /// Display name (`Multi-hop Numerical Reasoning`).
    pub name: String,
    /// Relative share when a pipeline samples the category mix; at least 0.
    pub weight: f64,
    /// One-paragraph definition.
    pub definition: String,
    /// Question templates, with `{placeholders}`; at least one.
    pub templates: Vec<String>,
    /// Four to six example questions.
    pub examples: Vec<String>,
    /// The workflow an analyst follows, one step per entry; at least one.
    pub procedure: Vec<String>,
}

/// All categories of a taxonomy, sorted by id, and the files they came from.
#[derive(Debug, Clone)]
pub struct Taxonomy {
    /// The categories, sorted by id.
    pub categories: Vec<Category>,
    sources: Vec<FileDep>,
}

impl Taxonomy {
    /// Loads the taxonomy in `dir`, or the built-in one. Errors name the file, line and column.
    pub fn load(dir: Option<&Path>) -> Result<Taxonomy, StageError> {
        let mut files: Vec<(String, String, FileDep)> = Vec::new();
        match dir {
            None => {
                for (name, text) in BUILTIN {
                    files.push((
                        name.to_string(),
                        text.to_string(),
                        FileDep::Builtin(format!("taxonomy/{name}"), text),
                    ));
                }
            }
            Some(dir) => {
                let entries = std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))?;
                for entry in entries {
                    let path = entry.map_err(|e| StageError::io(dir, e))?.path();
                    if path.extension().is_some_and(|e| e == "toml") {
                        let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
                        files.push((path.display().to_string(), text, FileDep::Contents(path)));
                    }
                }
            }
        }
        let mut categories = Vec::new();
        let mut sources = Vec::new();
        for (name, text, dep) in files {
            let category: Category = toml::from_str(&text).map_err(|e| locate(&name, &text, &e))?;
            check(&name, &category)?;
            categories.push(category);
            sources.push(dep);
        }
        if categories.is_empty() {
            return Err(StageError::invalid(dir.unwrap_or(Path::new("taxonomy")), "no category files (*.toml)"));
        }
        categories.sort_by(|a, b| a.id.cmp(&b.id));
        sources.sort();
        if let Some(w) = categories.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(StageError::Taxonomy(format!("category `{}` is defined twice", w[0].id)));
        }
        Ok(Taxonomy { categories, sources })
    }

    /// The category `id`.
    pub fn get(&self, id: &str) -> Option<&Category> {
        self.categories.iter().find(|c| c.id == id)
    }

    /// The files the taxonomy was read from, for stage fingerprints.
    pub fn files(&self) -> Vec<FileDep> {
        self.sources.clone()
    }
}

fn locate(name: &str, text: &str, e: &toml::de::Error) -> StageError {
    let offset = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
    let line = text[..offset].matches('\n').count() + 1;
    let column = offset - text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    StageError::invalid(format!("{name}:{line}:{column}"), e.message())
}

fn check(name: &str, c: &Category) -> Result<(), StageError> {
    let stem = Path::new(name).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let problem = if c.id != stem {
        Some(format!("`id` is `{}` but the file is named `{stem}.toml`; they must match", c.id))
    } else if !(4..=6).contains(&c.examples.len()) {
        Some(format!("`examples` must hold 4 to 6 questions, got {}", c.examples.len()))
    } else if c.templates.is_empty() {
        Some("`templates` must hold at least one question template".to_string())
    } else if c.procedure.is_empty() {
        Some("`procedure` must hold at least one step".to_string())
    } else if c.weight.is_nan() || c.weight < 0.0 {
        Some(format!("`weight` must be at least 0, got {}", c.weight))
    } else {
        None
    };
    problem.map_or(Ok(()), |p| Err(StageError::invalid(name, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_taxonomy_has_the_18_recipe_categories() {
        let t = Taxonomy::load(None).unwrap();
        assert_eq!(t.categories.len(), 18);
        assert_eq!(t.get("distribution_analysis").unwrap().name, "Distribution Analysis");
        assert_eq!(t.files().len(), 18);
        // The built-in list covers every file of the repository's folder.
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../taxonomy")).unwrap().count();
        assert_eq!(on_disk, BUILTIN.len());
    }

    #[test]
    fn a_bad_category_file_is_located() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("x.toml"), "id = \"x\"\nname = 3\n").unwrap();
        let err = Taxonomy::load(Some(tmp.path())).unwrap_err().to_string();
        assert!(err.contains("x.toml:2:8: invalid type"), "{err}");
        std::fs::write(
            tmp.path().join("x.toml"),
            "id = \"x\"\nname = \"X\"\nweight = 1\ndefinition = \"d\"\ntemplates = [\"t\"]\nexamples = [\"a\"]\nprocedure = [\"p\"]\n",
        )
        .unwrap();
        let err = Taxonomy::load(Some(tmp.path())).unwrap_err().to_string();
        assert!(err.ends_with("x.toml: `examples` must hold 4 to 6 questions, got 1"), "{err}");
    }
}
