//! From a pipeline file to a checked [`Plan`]: parse, resolve inputs, build the stages from their
//! parameters, order the DAG, check schemas. Every problem is collected before anything runs.

use std::path::{Path, PathBuf};

use arrow::datatypes::SchemaRef;

use crate::error::{Diagnostic, Diagnostics, Error, Result, did_you_mean};
use crate::graph::Graph;
use crate::registry::Registry;
use crate::rows::check_lineage;
use crate::spec::{self, PipelineSettings, Spec, StageLimits};
use crate::stage::{CheckCx, InputSchema, Problem, Stage};

/// A validated pipeline, ready to run: the raw file is dropped once it is checked.
#[derive(Debug)]
pub struct Plan {
    /// The pipeline file.
    pub file: PathBuf,
    /// The `[pipeline]` table.
    pub settings: PipelineSettings,
    /// The stages, in name order (the `[stages]` table is read sorted).
    pub stages: Vec<PlannedStage>,
    /// Stages and their inputs, indexed like `stages`.
    pub graph: Graph,
    /// A topological order of the stages.
    pub order: Vec<usize>,
    /// Where datasets are written.
    pub output_dir: PathBuf,
    /// Context for parameter checks and file dependencies.
    pub check_cx: CheckCx,
}

/// One checked stage of a plan.
#[derive(Debug)]
pub struct PlannedStage {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The built stage.
    pub stage: Box<dyn Stage>,
    /// Its parameters, resolved (what the fingerprint hashes).
    pub params: serde_json::Value,
    /// Its own spending caps.
    pub limits: StageLimits,
    /// Its output schema.
    pub schema: SchemaRef,
}

impl Plan {
    /// Loads and checks the pipeline at `path`. On failure the error lists every problem.
    pub async fn load(path: &Path, registry: &Registry) -> Result<Plan> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let at = e.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(e.as_bytes());
                let map = crate::error::SourceMap::new(path, &text);
                let diag = map.diagnostic(
                    at..at,
                    format!("not a text file: the byte at offset {at} is not UTF-8"),
                    Some("a pipeline file is TOML text, saved as UTF-8".into()),
                );
                return Err(Error::Config(Diagnostics(vec![diag])));
            }
        };
        Self::from_text(path, &text, registry).await
    }

    /// Plans the pipeline `text`, read as if it were the file at `path` (relative paths are
    /// relative to its folder): for pipelines kiln writes itself, such as `kiln train --rl`'s.
    pub async fn from_text(path: &Path, text: &str, registry: &Registry) -> Result<Plan> {
        let (spec, mut diags) = spec::parse(path, text, registry);
        let Some(spec) = spec else { return Err(Error::Config(Diagnostics(diags).normalize())) };
        let resolve = |dir: &Option<PathBuf>| dir.as_ref().map(|d| spec.base_dir.join(d));
        let output_dir = match &spec.settings.output_dir {
            Some(dir) => spec.base_dir.join(dir),
            None => PathBuf::from("outputs").join(&spec.settings.name),
        };
        let check_cx = CheckCx {
            base_dir: spec.base_dir.clone(),
            taxonomy: resolve(&spec.settings.taxonomy),
            templates: resolve(&spec.settings.templates),
            models: spec.models.clone(),
            output_dir: output_dir.clone(),
            stages: spec.stages.iter().map(|s| s.name.clone()).collect(),
        };

        check_settings(&spec, &check_cx, &mut diags);
        let graph = resolve_inputs(&spec, &mut diags);
        let built: Vec<Option<Box<dyn Stage>>> = spec
            .stages
            .iter()
            .map(|s| {
                let mut problems = Vec::new();
                let stage = s.config.as_ref()?.build(&check_cx, &mut problems);
                diags.extend(problems.into_iter().map(|p| s.diagnostic(&spec.map, p)));
                stage
            })
            .collect();
        let order = match graph.topo_order() {
            Ok(order) => order,
            Err(cycle) => {
                let first = &spec.stages[cycle[0]];
                diags.push(spec.map.diagnostic(
                    first.name_span(),
                    format!("the stages form a cycle: {}", graph.describe_path(&cycle)),
                    Some("a stage cannot read, directly or not, its own output: remove one of these inputs".into()),
                ));
                // The stages outside the cycle (and not downstream of it) are still checked.
                graph.acyclic_order()
            }
        };
        let schemas = check_schemas(&spec, &built, &check_cx, &graph, &order, &mut diags).await;
        if !diags.is_empty() {
            return Err(Error::Config(Diagnostics(diags).normalize()));
        }
        let mut stages = Vec::new();
        for ((s, stage), schema) in spec.stages.into_iter().zip(built).zip(schemas) {
            let (Some(stage), Some(schema)) = (stage, schema) else {
                return Err(Error::Internal(format!("stage `{}` was not checked, yet nothing was reported", s.name)));
            };
            stages.push(PlannedStage { name: s.name, kind: s.kind, stage, params: s.params, limits: s.limits, schema });
        }
        let file = spec.map.file().to_path_buf();
        Ok(Plan { file, settings: spec.settings, stages, graph, order, output_dir, check_cx })
    }

    /// Index of the stage named `name`.
    pub fn stage_index(&self, name: &str) -> Result<usize> {
        self.stages.iter().position(|s| s.name == name).ok_or_else(|| {
            let names = self.stages.iter().map(|s| s.name.as_str());
            let hint =
                did_you_mean(name, names).unwrap_or_else(|| format!("stages: {}", self.stage_names().join(", ")));
            Error::Usage(format!("no stage named `{name}` in {}; {hint}", self.file.display()))
        })
    }

    /// Stage names, in name order.
    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.name.clone()).collect()
    }

    /// The built stage at `i`.
    pub fn stage(&self, i: usize) -> &dyn Stage {
        self.stages[i].stage.as_ref()
    }
}

fn check_settings(spec: &Spec, cx: &CheckCx, diags: &mut Vec<Diagnostic>) {
    let name = &spec.settings.name;
    let one_folder = Path::new(name).components().count() == 1
        && matches!(Path::new(name).components().next(), Some(std::path::Component::Normal(_)));
    if spec.settings.output_dir.is_none() && (!one_folder || name.starts_with('.')) {
        let span = spec.settings_spans.get("name").cloned().unwrap_or(0..0);
        diags.push(spec.map.diagnostic(
            span,
            format!("`name` is the output folder `outputs/<name>`: one folder name, got {name:?}"),
            Some("use letters, digits, `-` and `_`, or set `output_dir`".into()),
        ));
    }
    let caps = StageLimits { max_tokens: spec.settings.max_tokens, max_cost_usd: spec.settings.max_cost_usd };
    for (key, message) in caps.problems() {
        let span = spec.settings_spans.get(key).cloned().unwrap_or(0..0);
        diags.push(spec.map.diagnostic(span, message, None));
    }
    for stage in &spec.stages {
        for (key, message) in stage.limits.problems() {
            diags.push(stage.diagnostic(&spec.map, Problem::new(key, message)));
        }
    }
    let dirs = [("templates", &spec.settings.templates), ("taxonomy", &spec.settings.taxonomy)];
    for (key, dir) in dirs {
        if let Some(dir) = dir
            && !cx.resolve(dir).is_dir()
        {
            let span = spec.settings_spans.get(key).cloned().unwrap_or(0..0);
            diags.push(spec.map.diagnostic(
                span,
                format!("{key} folder `{}` not found (relative to the pipeline file)", dir.display()),
                Some(format!("create it, or remove `{key}` to use the built-in {key}")),
            ));
        }
    }
}

fn resolve_inputs(spec: &Spec, diags: &mut Vec<Diagnostic>) -> Graph {
    let names: Vec<&str> = spec.stages.iter().map(|s| s.name.as_str()).collect();
    let nodes = spec
        .stages
        .iter()
        .map(|s| {
            let mut ups = Vec::new();
            for (i, input) in s.inputs.iter().enumerate() {
                match names.iter().position(|n| n == input) {
                    Some(u) if ups.contains(&u) => diags.push(spec.map.diagnostic(
                        s.input_span(i),
                        format!("stage `{}`: input `{input}` is listed twice", s.name),
                        Some("list each input once".into()),
                    )),
                    Some(u) => ups.push(u),
                    None => {
                        let help = did_you_mean(input, names.iter().copied())
                            .unwrap_or_else(|| format!("inputs name other stages of this file: {}", names.join(", ")));
                        diags.push(spec.map.diagnostic(
                            s.input_span(i),
                            format!("stage `{}`: unknown input `{input}`", s.name),
                            Some(help),
                        ));
                    }
                }
            }
            (s.name.clone(), s.kind.clone(), ups)
        })
        .collect();
    Graph::new(nodes)
}

async fn check_schemas(
    spec: &Spec,
    built: &[Option<Box<dyn Stage>>],
    cx: &CheckCx,
    graph: &Graph,
    order: &[usize],
    diags: &mut Vec<Diagnostic>,
) -> Vec<Option<SchemaRef>> {
    let mut schemas: Vec<Option<SchemaRef>> = vec![None; spec.stages.len()];
    for &i in order {
        let s = &spec.stages[i];
        let Some(stage) = &built[i] else { continue };
        let inputs: Option<Vec<InputSchema>> = graph
            .inputs(i)
            .iter()
            .map(|&u| {
                schemas[u].clone().map(|schema| InputSchema {
                    name: spec.stages[u].name.clone(),
                    kind: spec.stages[u].kind.clone(),
                    schema,
                })
            })
            .collect();
        // An upstream problem is already reported; checking against a guess would only add noise.
        let Some(inputs) = inputs else { continue };
        if !s.inputs_valid() || inputs.len() != s.inputs.len() {
            continue;
        }
        match stage.output_schema(cx, &inputs).await {
            Ok(schema) => match check_lineage(&schema) {
                Ok(()) => schemas[i] = Some(schema),
                Err(e) => diags.push(spec.map.diagnostic(s.name_span(), format!("stage `{}`: {e}", s.name), None)),
            },
            Err(problems) => diags.extend(problems.into_iter().map(|p| s.diagnostic(&spec.map, p))),
        }
    }
    schemas
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::Schema;

    use super::*;
    use crate::registry::Kind;
    use crate::stage::{Config, Input, Output, Problem, StageCx};

    /// A kind that reads at most one input and whose `size` must be at most 10.
    #[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Pass {
        #[serde(default)]
        size: u32,
    }

    impl Config for Pass {
        fn build(&self, _: &CheckCx, problems: &mut Vec<Problem>) -> Option<Box<dyn Stage>> {
            if self.size > 10 {
                problems.push(Problem::new("size", format!("`size` is at most 10, got {}", self.size)));
            }
            Some(Box::new(self.clone()))
        }
    }

    #[async_trait::async_trait]
    impl Stage for Pass {
        async fn output_schema(&self, _: &CheckCx, inputs: &[InputSchema]) -> Result<SchemaRef, Vec<Problem>> {
            if inputs.len() > 1 {
                return Err(vec![Problem::new("inputs", "a `pass` stage reads one input at most")]);
            }
            Ok(Arc::new(Schema::new(crate::rows::lineage_fields().to_vec())))
        }

        async fn run(&self, _: &StageCx, _: &[Input]) -> Result<Output> {
            Ok(Output::default())
        }
    }

    async fn load(text: &str) -> Result<Plan> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        Plan::load(&path, &Registry::new(vec![Kind::of::<Pass>("pass", "passes rows on")])).await
    }

    fn problems(e: Error) -> Vec<String> {
        match e {
            Error::Config(d) => d.0.into_iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect(),
            other => panic!("not a configuration error: {other}"),
        }
    }

    #[tokio::test]
    async fn a_valid_pipeline_is_ordered_and_keeps_resolved_parameters() {
        let text = "[pipeline]\nname = \"p\"\n\n[stages.b]\nkind = \"pass\"\ninputs = [\"a\"]\n\n[stages.a]\nkind = \"pass\"\n";
        let plan = load(text).await.unwrap();
        assert_eq!(plan.stage_names(), ["a", "b"]);
        let text = text.replace("[stages.a]", "[stages.c]").replace("[\"a\"]", "[\"c\"]");
        let plan = load(&text).await.unwrap();
        let order: Vec<&str> = plan.order.iter().map(|&i| plan.stages[i].name.as_str()).collect();
        assert_eq!(order, ["c", "b"], "inputs come first");
        assert_eq!(plan.stages[1].params, serde_json::json!({"size": 0}), "defaults are written out");
        assert_eq!(plan.output_dir, PathBuf::from("outputs/p"));
        assert!(plan.stage_index("x").unwrap_err().to_string().contains("no stage named `x`"));
    }

    #[tokio::test]
    async fn every_problem_is_reported_at_once_at_its_position() {
        let text = "[pipeline]\nname = \"p\"\n\n[stages.a]\nkind = \"pass\"\nsize = 11\n\n\
                    [stages.b]\nkind = \"pass\"\ninputs = [\"a\", \"ghost\"]\n\n[stages.c]\nkind = \"pass\"\n\
                    inputs = [\"a\", \"d\"]\n\n[stages.d]\nkind = \"pass\"\n";
        let found = problems(load(text).await.unwrap_err());
        assert_eq!(
            found,
            [
                "6:8 stage `a`: `size` is at most 10, got 11",
                "10:16 stage `b`: unknown input `ghost`",
                "14:10 stage `c`: a `pass` stage reads one input at most",
            ],
            "a parameter problem does not stop the schema checks"
        );
        let cycle = "[pipeline]\nname = \"p\"\n\n[stages.a]\nkind = \"pass\"\ninputs = [\"b\"]\n\n\
                     [stages.b]\nkind = \"pass\"\ninputs = [\"a\"]\n";
        assert_eq!(problems(load(cycle).await.unwrap_err()), ["4:9 the stages form a cycle: a -> b -> a"]);
    }
}
