//! The table of stage kinds a pipeline may use.
//!
//! The engine does not know any kind itself: the `kiln-stages` crate builds a [`Registry`] with
//! one [`Kind::of`] line per kind, and the binary hands it to [`crate::plan::Plan::load`].

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};
use toml::de::ValueDeserializer;

use crate::stage::Config;

type BuildFn = fn(ValueDeserializer<'_>) -> Result<Built, toml::de::Error>;

/// A stage's parameters read, with every default written out as canonical JSON (sorted keys).
/// Fingerprints hash this form, so writing a default out, or reordering keys, changes nothing,
/// and changing a default reruns the stage.
pub struct Built {
    /// The parameters, to build the stage from once the pipeline is known.
    pub config: Box<dyn Config>,
    /// Its resolved parameters.
    pub resolved: serde_json::Value,
}

/// One stage kind: its name, how to build it from TOML, and its parameter names.
#[derive(Clone)]
pub struct Kind {
    /// The `kind = "..."` string.
    pub name: &'static str,
    /// One line for `kiln` help and docs.
    pub summary: &'static str,
    build: BuildFn,
    fields: &'static [&'static str],
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kind").field("name", &self.name).field("fields", &self.fields).finish()
    }
}

fn build<C: DeserializeOwned + Serialize + Config>(de: ValueDeserializer<'_>) -> Result<Built, toml::de::Error> {
    let config = C::deserialize(de)?;
    // serde_json's maps are sorted (no `preserve_order` in this workspace), so this is canonical.
    let resolved = serde_json::to_value(&config).map_err(<toml::de::Error as de::Error>::custom)?;
    Ok(Built { config: Box::new(config), resolved })
}

impl Kind {
    /// A kind whose parameters are `C`.
    pub fn of<C: DeserializeOwned + Serialize + Config>(name: &'static str, summary: &'static str) -> Kind {
        Kind { name, summary, build: build::<C>, fields: struct_fields::<C>() }
    }

    /// Parameter names the kind accepts (besides `kind` and `inputs`).
    pub fn fields(&self) -> &'static [&'static str] {
        self.fields
    }

    /// Deserializes the parameters.
    pub fn build(&self, de: ValueDeserializer<'_>) -> Result<Built, toml::de::Error> {
        (self.build)(de)
    }
}

/// A `[models.<name>]` table resolved: every default written out (canonical JSON, for
/// fingerprints), and the problems of its values as `(key, message)`.
pub struct ResolvedModel {
    /// The table with its defaults.
    pub resolved: serde_json::Value,
    /// What is wrong with its values, by key.
    pub problems: Vec<(&'static str, String)>,
}

type ModelBuildFn = Arc<dyn for<'a> Fn(ValueDeserializer<'a>) -> Result<ResolvedModel, toml::de::Error> + Send + Sync>;

/// How `[models.<name>]` tables are read and checked. The engine does not know the LLM client's
/// settings: the stages crate provides them, and every table is checked, used or not, each
/// problem at its own key.
#[derive(Clone)]
pub struct ModelTable {
    build: ModelBuildFn,
    fields: &'static [&'static str],
}

impl fmt::Debug for ModelTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelTable").field("fields", &self.fields).finish()
    }
}

impl ModelTable {
    /// Tables read as `C`, whose values `problems` checks.
    pub fn of<C: DeserializeOwned + Serialize + 'static>(problems: fn(&C) -> Vec<(&'static str, String)>) -> Self {
        let build = move |de: ValueDeserializer<'_>| {
            let config = C::deserialize(de)?;
            let resolved = serde_json::to_value(&config).map_err(<toml::de::Error as de::Error>::custom)?;
            Ok(ResolvedModel { resolved, problems: problems(&config) })
        };
        ModelTable { build: Arc::new(build), fields: struct_fields::<C>() }
    }

    /// The keys a table may hold.
    pub fn fields(&self) -> &'static [&'static str] {
        self.fields
    }

    /// Reads one table.
    pub fn build(&self, de: ValueDeserializer<'_>) -> Result<ResolvedModel, toml::de::Error> {
        (self.build)(de)
    }
}

/// All kinds known to a run, and how its model tables are read.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    kinds: Vec<Kind>,
    models: Option<ModelTable>,
}

impl Registry {
    /// A registry of `kinds`.
    pub fn new(kinds: Vec<Kind>) -> Self {
        Registry { kinds, models: None }
    }

    /// This registry, reading `[models.<name>]` tables with `table`.
    pub fn with_models(mut self, table: ModelTable) -> Self {
        self.models = Some(table);
        self
    }

    /// How model tables are read, if the registry knows.
    pub fn model_table(&self) -> Option<&ModelTable> {
        self.models.as_ref()
    }

    /// This registry with one more kind (for kinds that live outside `kiln-stages`, such as
    /// `train_sft`, which keeps burn out of the stages crate).
    pub fn with(mut self, kind: Kind) -> Self {
        self.kinds.push(kind);
        self
    }

    /// The kind named `name`.
    pub fn get(&self, name: &str) -> Option<&Kind> {
        self.kinds.iter().find(|k| k.name == name)
    }

    /// Every kind, in registration order.
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }
}

/// Reads the field names a derived `Deserialize` struct declares, without any input.
pub(crate) fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut probe = Probe(None);
    let _ = T::deserialize(&mut probe);
    probe.0.unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Params {
        query: String,
        limit: Option<u32>,
    }

    #[test]
    fn probe_reads_declared_fields() {
        assert_eq!(struct_fields::<Params>(), &["query", "limit"]);
    }
}
