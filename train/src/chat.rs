//! Chat templates rendered with minijinja the way Hugging Face's `apply_chat_template` renders
//! them with Jinja2: trimmed blocks, Python string methods, `raise_exception`, and a `tojson` that
//! matches Python's `json.dumps(ensure_ascii=False)` (minijinja's own escapes `<`, `>`, `&`, `'` and
//! drops the spaces after `,` and `:`).

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template text, as loaded.
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; the error names the template line that fails to parse.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // Llama 3 templates print today's date.
        env.add_function("strftime_now", |fmt: String| chrono::Utc::now().format(&fmt).to_string());
        env.add_template_owned("chat", source.to_string())?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Renders a conversation. `messages` and `tools` are JSON-shaped values (see
    /// [`value_from_json`] to keep object key order as written).
    pub fn render(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let template = self.env.get_template("chat")?;
        template.render(minijinja::context! {
            messages => messages,
            tools => tools.cloned().unwrap_or(Value::from(())),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }

    /// Renders plain `(role, content)` turns.
    pub fn render_turns(&self, turns: &[(&str, &str)], add_generation_prompt: bool) -> Result<String, Error> {
        let messages: Vec<Value> =
            turns.iter().map(|(role, content)| minijinja::context! { role => role, content => content }).collect();
        self.render(&Value::from(messages), None, add_generation_prompt)
    }
}

/// Parses JSON into a template value, keeping object keys in their written order (as Python's
/// `json.loads` does), which `tojson` then reproduces.
pub fn value_from_json(text: &str) -> Result<Value, serde_json::Error> {
    use serde::Deserialize;
    Value::deserialize(&mut serde_json::Deserializer::from_str(text))
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)` as Python writes it.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser =
                serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(&pad));
            value.serialize(&mut ser)
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

/// Python's default separators: `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}
