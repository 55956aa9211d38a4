//! Parsing a pipeline TOML file into a [`Spec`]: settings and stages with their typed parameters.
//!
//! Parsing keeps the span of every key and value, so that every problem found here, in the graph
//! or in the schemas is reported as `file:line:col` with a hint. Parsing never stops at the first
//! problem: it returns what it could build together with every diagnostic.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::error::{Diagnostic, Diagnostics, SourceMap, did_you_mean};
use crate::registry::{Built, Registry};
use crate::stage::{Config, Problem};

/// The `[pipeline]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Name of the pipeline; the default output folder is `outputs/<name>`.
    pub name: String,
    /// Where datasets go, relative to the pipeline file. Default: `outputs/<name>` in the
    /// current folder.
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Seed every random choice derives from. Default: 0.
    #[serde(default)]
    pub seed: u64,
    /// Free text shown by `kiln dag`.
    #[serde(default)]
    pub description: Option<String>,
    /// Folder of prompt templates overriding the built-in ones, relative to the pipeline file.
    #[serde(default)]
    pub templates: Option<PathBuf>,
    /// Folder of the task taxonomy, relative to the pipeline file.
    #[serde(default)]
    pub taxonomy: Option<PathBuf>,
    /// Most LLM tokens (prompt and completion) one run may spend. Default: unlimited.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most USD one run may spend on LLM requests (from the models' prices). Default: unlimited.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
}

/// Keys of a stage table that the engine reads itself, whatever the kind.
const ENGINE_KEYS: &[&str] = &["kind", "inputs", "max_tokens", "max_cost_usd"];

/// Spending caps any stage may set, besides the pipeline's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct StageLimits {
    /// Most LLM tokens this stage may spend in one run.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Most USD this stage may spend in one run.
    #[serde(default)]
    pub max_cost_usd: Option<f64>,
}

impl StageLimits {
    /// Problems with the caps, as `(key, message)`: a cap is a positive, finite amount.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.max_tokens == Some(0) {
            out.push(("max_tokens", "`max_tokens` must be at least 1 (leave it out for no cap), got 0".to_string()));
        }
        if let Some(usd) = self.max_cost_usd.filter(|c| !(c.is_finite() && *c > 0.0)) {
            out.push((
                "max_cost_usd",
                format!("`max_cost_usd` must be an amount in USD above 0 (leave it out for no cap), got {usd}"),
            ));
        }
        out
    }
}

/// Top-level tables a pipeline file may hold.
const TOP_LEVEL: &[&str] = &["pipeline", "models", "stages"];

/// A parsed pipeline file.
#[derive(Debug)]
pub struct Spec {
    /// Locates spans of the file.
    pub map: SourceMap,
    /// Folder of the pipeline file.
    pub base_dir: PathBuf,
    /// The `[pipeline]` table.
    pub settings: PipelineSettings,
    /// Span of the `[pipeline]` table's keys, for settings problems.
    pub settings_spans: BTreeMap<String, Range<usize>>,
    /// `[models.<name>]` tables, shared by stages that call LLMs, as canonical JSON: resolved
    /// (defaults written out) when valid, as written otherwise.
    pub models: serde_json::Value,
    /// Stages, in name order (TOML tables are read sorted by key).
    pub stages: Vec<StageSpec>,
}

/// One `[stages.<name>]` table.
#[derive(Debug)]
pub struct StageSpec {
    /// Stage name (the table key).
    pub name: String,
    /// The `kind` string.
    pub kind: String,
    /// Names of upstream stages, in the order written.
    pub inputs: Vec<String>,
    /// Kind-specific parameters resolved (every default written out) as canonical JSON (sorted
    /// keys), for fingerprints; `null` when they are invalid.
    pub params: serde_json::Value,
    /// The parameters read, when they were well typed (built into the stage by the plan).
    pub config: Option<Box<dyn Config>>,
    /// Spending caps of this stage alone (`max_tokens`, `max_cost_usd` in its table).
    pub limits: StageLimits,
    name_span: Range<usize>,
    input_spans: Vec<Range<usize>>,
    inputs_valid: bool,
    key_spans: BTreeMap<String, Range<usize>>,
}

impl StageSpec {
    /// Span of the stage name.
    pub fn name_span(&self) -> Range<usize> {
        self.name_span.clone()
    }

    /// False when `inputs` was malformed, so checks that depend on the inputs are skipped.
    pub fn inputs_valid(&self) -> bool {
        self.inputs_valid
    }

    /// Span of the `i`-th input.
    pub fn input_span(&self, i: usize) -> Range<usize> {
        self.input_spans.get(i).cloned().unwrap_or(self.name_span.clone())
    }

    /// Span of the value at a key path (`paths.1`), falling back to the closest parent, then
    /// to the stage name.
    pub fn span_of(&self, at: &[String]) -> Range<usize> {
        (0..=at.len())
            .rev()
            .find_map(|n| self.key_spans.get(&at[..n].join(".")))
            .cloned()
            .unwrap_or(self.name_span.clone())
    }

    /// A diagnostic for a stage problem.
    pub fn diagnostic(&self, map: &SourceMap, problem: Problem) -> Diagnostic {
        map.diagnostic(self.span_of(&problem.at), format!("stage `{}`: {}", self.name, problem.message), problem.help)
    }
}

/// Parses `text`, the contents of `file`, building each stage with `registry`.
/// Returns the spec (absent only when the file is not TOML at all or lacks `[pipeline]`) and every
/// problem found.
pub fn parse(file: &Path, text: &str, registry: &Registry) -> (Option<Spec>, Vec<Diagnostic>) {
    let map = SourceMap::new(file, text);
    let (root, errors) = DeTable::parse_recoverable(text);
    let mut diags = syntax_errors(&map, text, &errors);
    let root_table = root.get_ref();

    for (key, _) in root_table.iter() {
        if !TOP_LEVEL.contains(&key.get_ref().as_ref()) {
            let help = did_you_mean(key.get_ref(), TOP_LEVEL.iter().copied())
                .or_else(|| Some(format!("a pipeline file holds the tables {}", backticked(TOP_LEVEL))));
            diags.push(map.diagnostic(key.span(), format!("unknown top-level key `{}`", key.get_ref()), help));
        }
    }

    let Some(pipeline) = lookup(root_table, "pipeline") else {
        diags.push(map.diagnostic(
            0..0,
            "missing `[pipeline]` table",
            Some("add `[pipeline]` with at least `name = \"...\"`".into()),
        ));
        return (None, diags);
    };
    let fields = crate::registry::struct_fields::<PipelineSettings>();
    let (settings, errors) = deserialize_all(&map, pipeline.clone(), Some(fields), PipelineSettings::deserialize);
    diags.extend(errors);
    let mut settings_spans = BTreeMap::new();
    collect_spans(pipeline, "", &mut settings_spans);

    let models = match lookup(root_table, "models") {
        None => serde_json::Value::Null,
        Some(models) => parse_models(&map, models, registry, &mut diags),
    };

    let mut stages = Vec::new();
    match lookup(root_table, "stages").map(|v| (v, v.get_ref())) {
        None => diags.push(map.diagnostic(
            0..0,
            "the pipeline has no stages",
            Some("add a table such as `[stages.files]` with `kind = \"profile\"`".into()),
        )),
        Some((_, DeValue::Table(table))) => {
            for (name, value) in table.iter() {
                if let Some(stage) = parse_stage(&map, name, value, registry, &mut diags) {
                    stages.push(stage);
                }
            }
        }
        Some((v, other)) => diags.push(map.diagnostic(
            v.span(),
            format!("`stages` must be a table, got {}", other.type_str()),
            Some("declare stages as `[stages.<name>]` tables".into()),
        )),
    }

    // A `[pipeline]` table with problems still lets every stage and model be checked.
    let Some(settings) = settings else { return (None, diags) };
    let base_dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    (Some(Spec { map, base_dir, settings, settings_spans, models, stages }), diags)
}

fn parse_stage(
    map: &SourceMap,
    name: &Spanned<toml::de::DeString<'_>>,
    value: &Spanned<DeValue<'_>>,
    registry: &Registry,
    diags: &mut Vec<Diagnostic>,
) -> Option<StageSpec> {
    let stage_name = name.get_ref().to_string();
    let DeValue::Table(table) = value.get_ref() else {
        diags.push(map.diagnostic(
            value.span(),
            format!("stage `{stage_name}` must be a table, got {}", value.get_ref().type_str()),
            Some(format!("write it as `[stages.{stage_name}]`")),
        ));
        return None;
    };
    if !valid_name(&stage_name) {
        diags.push(map.diagnostic(
            name.span(),
            format!("invalid stage name `{stage_name}`"),
            Some("stage names are also SQL table names: use lowercase letters, digits and `_`, starting with a letter".into()),
        ));
    }

    let mut key_spans = BTreeMap::new();
    collect_spans(value, "", &mut key_spans);

    let kind = match lookup(table, "kind") {
        Some(v) => match v.get_ref().as_str() {
            Some(k) => Some((k.to_string(), v.span())),
            None => {
                diags.push(map.diagnostic(
                    v.span(),
                    format!("stage `{stage_name}`: `kind` must be a string, got {}", v.get_ref().type_str()),
                    None,
                ));
                None
            }
        },
        None => {
            diags.push(map.diagnostic(
                name.span(),
                format!("stage `{stage_name}` has no `kind`"),
                Some(format!("add `kind = \"...\"`; known kinds: {}", kind_list(registry))),
            ));
            None
        }
    };

    let mut inputs = Vec::new();
    let mut input_spans = Vec::new();
    let problems_before = diags.len();
    if let Some(v) = lookup(table, "inputs") {
        match v.get_ref() {
            DeValue::Array(items) => {
                for item in items.iter() {
                    match item.get_ref().as_str() {
                        Some(s) => {
                            inputs.push(s.to_string());
                            input_spans.push(item.span());
                        }
                        None => diags.push(map.diagnostic(
                            item.span(),
                            format!(
                                "stage `{stage_name}`: each input must be a stage name (a string), got {}",
                                item.get_ref().type_str()
                            ),
                            None,
                        )),
                    }
                }
            }
            other => diags.push(map.diagnostic(
                v.span(),
                format!("stage `{stage_name}`: `inputs` must be an array of stage names, got {}", other.type_str()),
                Some("write `inputs = [\"upstream\"]`".into()),
            )),
        }
    }

    let inputs_valid = diags.len() == problems_before;
    let limit_keys: DeTable<'_> = table
        .iter()
        .filter(|(k, _)| ["max_tokens", "max_cost_usd"].contains(&k.get_ref().as_ref()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let limits =
        StageLimits::deserialize(ValueDeserializer::from(Spanned::new(value.span(), DeValue::Table(limit_keys))))
            .unwrap_or_else(|e| {
                diags.push(toml_error(map, &e, None));
                StageLimits::default()
            });
    let params: DeTable<'_> = table
        .iter()
        .filter(|(k, _)| !ENGINE_KEYS.contains(&k.get_ref().as_ref()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let params_value = Spanned::new(value.span(), DeValue::Table(params));

    let built = kind.as_ref().and_then(|(kind, kind_span)| match registry.get(kind) {
        None => {
            let help = did_you_mean(kind, registry.kinds().iter().map(|k| k.name))
                .unwrap_or_else(|| format!("known kinds: {}", kind_list(registry)));
            diags.push(map.diagnostic(
                kind_span.clone(),
                format!("stage `{stage_name}`: unknown stage kind `{kind}`"),
                Some(help),
            ));
            None
        }
        Some(k) => {
            let (built, errors) = deserialize_all(map, params_value, Some(k.fields()), |de| k.build(de));
            diags.extend(errors.into_iter().map(|mut d| {
                d.message = format!("stage `{stage_name}` ({kind}): {}", d.message);
                d
            }));
            built
        }
    });
    let (config, params) = match built {
        Some(Built { config, resolved }) => (Some(config), resolved),
        None => (None, serde_json::Value::Null),
    };

    Some(StageSpec {
        name: stage_name,
        kind: kind.map(|k| k.0).unwrap_or_default(),
        inputs,
        params,
        config,
        limits,
        name_span: name.span(),
        input_spans,
        inputs_valid,
        key_spans,
    })
}

/// A TOML file of settings (such as `kiln train`'s) read into `T`, with every problem located as
/// `file:line:col`: syntax errors, unknown keys (with "did you mean"), values of the wrong type,
/// then, when those are all right, the problems `check` finds (at their keys' positions).
pub fn parse_settings<T: DeserializeOwned>(
    file: &Path,
    text: &str,
    check: impl FnOnce(&T) -> Vec<Problem>,
) -> Result<T, Diagnostics> {
    let map = SourceMap::new(file, text);
    let (root, errors) = DeTable::parse_recoverable(text);
    let mut diags = syntax_errors(&map, text, &errors);
    let root = Spanned::new(root.span(), DeValue::Table(root.get_ref().clone()));
    let fields = crate::registry::struct_fields::<T>();
    let (value, errors) = deserialize_all(&map, root.clone(), Some(fields), |de| T::deserialize(de));
    diags.extend(errors);
    match value {
        Some(value) if diags.is_empty() => {
            let mut spans = BTreeMap::new();
            collect_spans(&root, "", &mut spans);
            let span_of = |at: &[String]| {
                (0..=at.len()).rev().find_map(|n| spans.get(&at[..n].join("."))).cloned().unwrap_or(0..0)
            };
            diags.extend(check(&value).into_iter().map(|p| map.diagnostic(span_of(&p.at), p.message, p.help)));
            if diags.is_empty() { Ok(value) } else { Err(Diagnostics(diags).normalize()) }
        }
        _ => Err(Diagnostics(diags).normalize()),
    }
}

/// Deserializes `value` with `build`, reporting every unknown key, value of the wrong type and
/// missing key rather than only the first: after each error the entry that holds it (for a
/// missing key, the table that lacks it) is left out and the rest is tried again. Gives the value
/// only when there was no error. A key missing from the top-level table ends the search.
fn deserialize_all<'i, T>(
    map: &SourceMap,
    mut value: Spanned<DeValue<'i>>,
    fields: Option<&[&str]>,
    build: impl Fn(ValueDeserializer<'i>) -> Result<T, toml::de::Error>,
) -> (Option<T>, Vec<Diagnostic>) {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut left_out: Vec<Vec<String>> = Vec::new();
    loop {
        let e = match build(ValueDeserializer::from(value.clone())) {
            Ok(built) => return (diags.is_empty().then_some(built), diags),
            Err(e) => e,
        };
        let mut d = toml_error(map, &e, fields);
        let Some(span) = e.span() else {
            diags.push(d);
            return (None, diags);
        };
        let missing = e.message().strip_prefix("missing field `").and_then(|m| m.split('`').next());
        let culprit = match missing {
            Some(field) => {
                let table = path_of_value(&value, &span);
                let full = table.iter().flatten().cloned().chain([field.to_string()]).collect::<Vec<_>>();
                // Not reported when kiln left the key out itself, or a typo's "did you mean" names it.
                let typo = Some(format!("did you mean `{field}`?"));
                if !left_out.contains(&full) && !diags.iter().any(|old| old.help == typo) {
                    diags.push(d);
                }
                table.filter(|path| !path.is_empty())
            }
            None => {
                let key = key_at(&value, span.start);
                // serde's type errors do not say which key holds the bad value.
                if let Some(key) = key.as_ref().filter(|_| !d.message.contains(" field `")) {
                    d.message = format!("`{}`: {}", key.join("."), d.message);
                }
                diags.push(d);
                key
            }
        };
        match culprit {
            Some(path) => {
                value = without(&value, &path);
                left_out.push(path);
            }
            None => return (None, diags),
        }
    }
}

/// The key path of the innermost table entry whose key or value holds byte `at`.
fn key_at(value: &Spanned<DeValue<'_>>, at: usize) -> Option<Vec<String>> {
    let DeValue::Table(table) = value.get_ref() else { return None };
    let (key, inner) = table.iter().find(|(k, v)| k.span().contains(&at) || v.span().contains(&at))?;
    let mut path = vec![key.get_ref().to_string()];
    path.extend(key_at(inner, at).unwrap_or_default());
    Some(path)
}

/// The key path of the table whose span is `span` (empty for `value` itself).
fn path_of_value(value: &Spanned<DeValue<'_>>, span: &Range<usize>) -> Option<Vec<String>> {
    if value.span() == *span {
        return Some(Vec::new());
    }
    let DeValue::Table(table) = value.get_ref() else { return None };
    let (key, inner) = table.iter().find(|(_, v)| v.span().contains(&span.start))?;
    let mut path = vec![key.get_ref().to_string()];
    path.extend(path_of_value(inner, span)?);
    Some(path)
}

/// `value` without the entry at key `path` (non-empty).
fn without<'i>(value: &Spanned<DeValue<'i>>, path: &[String]) -> Spanned<DeValue<'i>> {
    let DeValue::Table(table) = value.get_ref() else { return value.clone() };
    let rebuilt = table
        .iter()
        .filter_map(|(k, v)| match path {
            [first, rest @ ..] if k.get_ref() == first.as_str() => {
                (!rest.is_empty()).then(|| (k.clone(), without(v, rest)))
            }
            _ => Some((k.clone(), v.clone())),
        })
        .collect();
    Spanned::new(value.span(), DeValue::Table(rebuilt))
}

/// The `[models]` tables as JSON, each resolved (defaults written out) when it is valid; every
/// table's problems, at their keys, whether a stage uses the model or not.
fn parse_models(
    map: &SourceMap,
    models: &Spanned<DeValue<'_>>,
    registry: &Registry,
    diags: &mut Vec<Diagnostic>,
) -> serde_json::Value {
    let DeValue::Table(tables) = models.get_ref() else {
        diags.push(map.diagnostic(
            models.span(),
            format!("`models` must be a table, got {}", models.get_ref().type_str()),
            Some("declare models as `[models.<name>]` tables".into()),
        ));
        return serde_json::Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (name, table) in tables.iter() {
        let name = name.get_ref().to_string();
        let Some(reader) = registry.model_table() else {
            out.insert(name, to_json(table));
            continue;
        };
        let (resolved, errors) = deserialize_all(map, table.clone(), Some(reader.fields()), |de| reader.build(de));
        diags.extend(errors.into_iter().map(|mut d| {
            d.message = format!("model `{name}`: {}", d.message);
            d
        }));
        let Some(resolved) = resolved else {
            out.insert(name, to_json(table));
            continue;
        };
        let mut spans = BTreeMap::new();
        collect_spans(table, "", &mut spans);
        for (key, message) in resolved.problems {
            let span = spans.get(key).cloned().unwrap_or(table.span());
            diags.push(map.diagnostic(span, format!("model `{name}`: {message}"), None));
        }
        out.insert(name, resolved.resolved);
    }
    serde_json::Value::Object(out)
}

/// Stage names double as SQL table names.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn lookup<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
    table.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
}

fn kind_list(registry: &Registry) -> String {
    let names: Vec<&str> = registry.kinds().iter().map(|k| k.name).collect();
    backticked(&names)
}

fn backticked(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// Diagnostics for TOML syntax errors. A table declared twice gives one "duplicate stage" (or
/// "duplicate table") error instead of one error per key it repeats.
fn syntax_errors(map: &SourceMap, text: &str, errors: &[toml::de::Error]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let mut duplicated_header: Option<usize> = None;
    for e in errors {
        let span = e.span().unwrap_or(0..0);
        if e.message().starts_with("duplicate key") {
            let line_start = text[..span.start.min(text.len())].rfind('\n').map(|i| i + 1).unwrap_or(0);
            let line = text[line_start..].lines().next().unwrap_or_default().trim_start();
            if line.starts_with('[') {
                duplicated_header = Some(span.start);
                let key = text.get(span.clone()).unwrap_or_default();
                let (what, help) = if line.starts_with("[stages.") {
                    (
                        format!("duplicate stage name `{key}`"),
                        "stage names must be unique: rename or remove one of the two tables",
                    )
                } else {
                    (format!("table `{key}` is declared twice"), "merge the two tables into one")
                };
                out.push(map.diagnostic(span, what, Some(help.into())));
                continue;
            }
            // Keys repeated because their whole table is repeated are already reported.
            if duplicated_header.is_some_and(|h| !text[h..span.start.max(h)].contains("\n[")) {
                continue;
            }
            let key = text.get(span.clone()).unwrap_or_default().trim();
            out.push(map.diagnostic(
                span,
                format!("duplicate key `{key}`"),
                Some("each key may appear only once in a table: remove one of the two".into()),
            ));
            continue;
        }
        out.push(toml_error(map, e, None));
    }
    out
}

/// Turns a toml error into a diagnostic, adding "did you mean" for unknown keys.
fn toml_error(map: &SourceMap, e: &toml::de::Error, fields: Option<&[&str]>) -> Diagnostic {
    let message = e.message().trim().to_string();
    // serde names the fields of the table that holds the unknown key (a nested table's own,
    // not the stage's); the probed stage fields are the fallback.
    let expected: Option<Vec<&str>> = message
        .split_once(", expected ")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect::<Vec<_>>())
        .filter(|list| !list.is_empty());
    let fields = expected.as_deref().or(fields);
    let help = match (message.strip_prefix("unknown field `"), fields) {
        (Some(rest), Some(fields)) => {
            let key = rest.split('`').next().unwrap_or_default();
            did_you_mean(key, fields.iter().copied()).or_else(|| Some(format!("accepted keys: {}", backticked(fields))))
        }
        _ if message.starts_with("duplicate key") => Some("each key may appear only once in a table".into()),
        _ if message.starts_with("invalid type") || message.starts_with("invalid value") => {
            Some("check the value against the documented type of this key".into())
        }
        _ if message.starts_with("missing field") => Some("add the missing key to this table".into()),
        _ => None,
    };
    let message = match message.strip_prefix("unknown field `") {
        Some(_) => message.split(", expected").next().unwrap_or(&message).to_string(),
        None => message,
    };
    map.diagnostic(e.span().unwrap_or(0..0), message, help)
}

/// Records the span of every value under `value`, keyed by dotted path.
fn collect_spans(value: &Spanned<DeValue<'_>>, prefix: &str, out: &mut BTreeMap<String, Range<usize>>) {
    out.insert(prefix.to_string(), value.span());
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match value.get_ref() {
        DeValue::Table(t) => t.iter().for_each(|(k, v)| collect_spans(v, &join(k.get_ref()), out)),
        DeValue::Array(a) => a.iter().enumerate().for_each(|(i, v)| collect_spans(v, &join(&i.to_string()), out)),
        _ => {}
    }
}

/// Canonical JSON of a TOML value (sorted keys), used in fingerprints and manifests.
fn to_json(value: &Spanned<DeValue<'_>>) -> serde_json::Value {
    serde_json::Value::deserialize(ValueDeserializer::from(value.clone())).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Settings {
        name: String,
        size: u32,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        rank: u32,
    }

    fn errors(text: &str) -> Vec<String> {
        match parse_settings::<Settings>(Path::new("s.toml"), text, |_| vec![Problem::new("size", "checked")]) {
            Ok(_) => vec![],
            Err(d) => d.0.iter().map(|d| format!("{}:{} {}", d.line, d.column, d.message)).collect(),
        }
    }

    #[test]
    fn every_type_error_and_unknown_key_is_reported_with_its_key() {
        let got = errors("name = 1\nsize = \"big\"\nextra = 2\ninner = { rank = -1 }\n");
        assert_eq!(
            got,
            [
                "1:8 `name`: invalid type: integer `1`, expected a string",
                "2:8 `size`: invalid type: string \"big\", expected u32",
                "3:1 unknown field `extra`",
                "4:18 `inner.rank`: invalid value: integer `-1`, expected u32",
            ]
        );
    }

    /// A kind with three defaulted parameters, for the fingerprint properties.
    #[derive(Debug, Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Toy {
        #[serde(default = "three")]
        size: u32,
        #[serde(default)]
        label: Option<String>,
        #[serde(default = "ratio")]
        ratio: f64,
    }
    fn three() -> u32 {
        3
    }
    fn ratio() -> f64 {
        0.5
    }

    impl crate::stage::Config for Toy {
        fn build(&self, _: &crate::stage::CheckCx, _: &mut Vec<Problem>) -> Option<Box<dyn crate::stage::Stage>> {
            None
        }
    }

    #[async_trait::async_trait]
    impl crate::stage::Stage for Toy {
        async fn output_schema(
            &self,
            _: &crate::stage::CheckCx,
            _: &[crate::stage::InputSchema],
        ) -> crate::Result<arrow::datatypes::SchemaRef, Vec<Problem>> {
            Ok(std::sync::Arc::new(arrow::datatypes::Schema::new(crate::rows::lineage_fields().to_vec())))
        }
        async fn run(
            &self,
            _: &crate::stage::StageCx,
            _: &[crate::stage::Input],
        ) -> crate::Result<crate::stage::Output> {
            Ok(crate::stage::Output::default())
        }
    }

    /// The resolved parameters of the one `toy` stage of a file with `keys` (in this order).
    fn resolved(keys: &[(&str, String)]) -> serde_json::Value {
        let registry = Registry::new(vec![crate::registry::Kind::of::<Toy>("toy", "a toy")]);
        let lines: Vec<String> = keys.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let text = format!("[pipeline]\nname = \"p\"\n\n[stages.t]\nkind = \"toy\"\n{}\n", lines.join("\n"));
        let (spec, diags) = parse(Path::new("p.toml"), &text, &registry);
        assert!(diags.is_empty(), "{diags:?}\n{text}");
        spec.unwrap().stages.remove(0).params
    }

    use proptest::prelude::*;

    proptest::proptest! {
        /// Fingerprints hash the resolved parameters: writing defaults out, in any order, or
        /// leaving them out gives the same parameters; a value that is not the default does not.
        #[test]
        fn key_order_and_written_defaults_do_not_change_the_parameters(
            order in proptest::strategy::Just(vec![0usize, 1, 2]).prop_shuffle(),
            written in proptest::collection::vec(proptest::bool::ANY, 3),
            label in "[a-z]{1,8}",
            size in 0u32..10,
        ) {
            let defaults = [("size", "3".to_string()), ("ratio", "0.5".to_string()), ("label", format!("{label:?}"))];
            let omitted = resolved(&[("label", format!("{label:?}"))]);
            let keys: Vec<(&str, String)> =
                order.iter().filter(|&&i| written[i] || i == 2).map(|&i| defaults[i].clone()).collect();
            prop_assert_eq!(resolved(&keys), omitted.clone());
            let changed = resolved(&[("size", size.to_string()), ("label", format!("{label:?}"))]);
            prop_assert_eq!(changed == omitted, size == 3);
        }
    }

    #[test]
    fn checks_run_only_on_well_typed_settings_and_point_at_their_key() {
        assert_eq!(errors("name = \"a\"\nsize = 3\n"), ["2:8 checked"]);
        assert_eq!(errors("size = 3\n"), ["1:1 missing field `name`"]);
    }
}
