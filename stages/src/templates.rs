//! Prompt templates (minijinja). The repository's `templates/` is compiled into kiln; a pipeline
//! may override any of them with a file of the same name in `[pipeline] templates = "dir"`.
//! Rendering is strict: a variable the template uses but the stage does not provide is an
//! error, found by `kiln check` where possible.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_pipeline::stage::{CheckCx, FileDep, Problem};
use minijinja::{Environment, UndefinedBehavior};

use crate::StageError;
use serde::Serialize;

/// Built-in templates, as `(file name, contents)`.
const BUILTIN: &[(&str, &str)] = &[
    ("compose.j2", include_str!("../../templates/compose.j2")),
    ("judge_answer.j2", include_str!("../../templates/judge_answer.j2")),
    ("judge_consistency.j2", include_str!("../../templates/judge_consistency.j2")),
    ("synthesize.j2", include_str!("../../templates/synthesize.j2")),
    ("trajectory_system.j2", include_str!("../../templates/trajectory_system.j2")),
];

/// Loaded templates, ready to render.
#[derive(Debug)]
pub struct Templates {
    env: Environment<'static>,
    files: Vec<FileDep>,
}

impl Templates {
    /// Loads `names`, each from `dir` when it holds that file, else built in.
    pub fn load(dir: Option<&Path>, names: &[&str]) -> Result<Templates, StageError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut files = Vec::new();
        for name in names {
            let custom = dir.map(|d| d.join(name)).filter(|p| p.is_file());
            let source = match &custom {
                Some(path) => {
                    files.push(FileDep::Contents(path.clone()));
                    std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?
                }
                None => {
                    let (_, text) = BUILTIN.iter().find(|(n, _)| n == name).ok_or_else(|| {
                        StageError::TemplateNotFound { name: name.to_string(), dir: dir.map(Path::to_path_buf) }
                    })?;
                    files.push(FileDep::Builtin(format!("templates/{name}"), text));
                    text.to_string()
                }
            };
            let shown = custom.clone().unwrap_or_else(|| Path::new("templates").join(name));
            env.add_template_owned(name.to_string(), source).map_err(|e| StageError::invalid(shown, e))?;
        }
        Ok(Templates { env, files })
    }

    /// One template given inline (a `prompt` parameter), named `name`.
    pub fn inline(name: &str, source: &str) -> Result<Templates, StageError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| StageError::invalid(format!("`{name}`"), e))?;
        Ok(Templates { env, files: Vec::new() })
    }

    /// Renders `name` with `vars`.
    pub fn render(&self, name: &str, vars: impl Serialize) -> Result<String, StageError> {
        let render = |e: minijinja::Error| StageError::Render { name: name.to_string(), why: format!("{e:#}") };
        self.env.get_template(name).map_err(render)?.render(vars).map_err(render)
    }

    /// Top-level variables `name` uses that are not in `provided`.
    pub fn missing_variables(&self, name: &str, provided: &[&str]) -> Vec<String> {
        let Ok(t) = self.env.get_template(name) else { return Vec::new() };
        let used: BTreeSet<String> = t.undeclared_variables(false).into_iter().collect();
        used.into_iter().filter(|v| !provided.contains(&v.as_str())).collect()
    }

    /// The template files, for stage fingerprints.
    pub fn files(&self) -> Vec<FileDep> {
        self.files.clone()
    }
}

/// A stage's `template` parameter loaded, or its problem: not found, not valid, or using
/// variables a `kind` stage does not provide.
pub fn check_template(cx: &CheckCx, name: &str, provided: &[&str], kind: &str) -> Result<Templates, Problem> {
    let t = Templates::load(cx.templates.as_deref(), &[name])
        .map_err(|e| Problem::new("template", e).help("put the file in the pipeline's `templates` folder"))?;
    let missing = t.missing_variables(name, provided);
    if !missing.is_empty() {
        return Err(Problem::new(
            "template",
            format!("template `{name}` uses undefined variables: {}", missing.join(", ")),
        )
        .help(format!("a {kind} template may use {}", provided.join(", "))));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_template_parses_and_covers_the_repository_folder() {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        let t = Templates::load(None, &names).unwrap();
        assert_eq!(t.files().len(), names.len());
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../templates")).unwrap().count();
        assert_eq!(on_disk, BUILTIN.len(), "every file of templates/ is compiled in");
        let judge =
            t.render("judge_consistency.j2", serde_json::json!({"question": "q", "answers": ["1", "1.01"]})).unwrap();
        assert!(judge.contains("[2] 1.01"));
        let vars = serde_json::json!({"sql": false, "data_dir": "/data", "files": ["a.csv"], "max_turns": 10, "procedure": ["Load.", "Count."], "category": "Counting"});
        assert!(t.render("trajectory_system.j2", vars).unwrap().contains("2. Count."));
    }

    #[test]
    fn overrides_win_and_missing_variables_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let builtin = Templates::load(Some(tmp.path()), &["synthesize.j2"]).unwrap();
        assert!(builtin.missing_variables("synthesize.j2", &["table", "categories", "category"]).is_empty());
        assert_eq!(builtin.missing_variables("synthesize.j2", &["table", "category"]), ["categories"]);

        std::fs::write(tmp.path().join("synthesize.j2"), "Q about {{ table.table }} in {{ langage }}").unwrap();
        let custom = Templates::load(Some(tmp.path()), &["synthesize.j2"]).unwrap();
        assert_eq!(custom.missing_variables("synthesize.j2", &["table", "categories", "category"]), ["langage"]);
        let err = custom.render("synthesize.j2", serde_json::json!({"table": {"table": "t"}})).unwrap_err();
        assert!(matches!(&err, StageError::Render { name, .. } if name == "synthesize.j2"), "{err}");
        assert!(err.to_string().contains("undefined"), "{err}");
        let missing = Templates::load(None, &["nope.j2"]).unwrap_err();
        assert!(matches!(missing, StageError::TemplateNotFound { .. }));
        assert!(missing.to_string().contains("template `nope.j2` not found"));
    }
}
