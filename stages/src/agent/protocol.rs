//! The turn protocol of RECIPE section 5, shared by model-written and scripted trajectories.
//!
//! An assistant turn is `<think>…</think>` followed by either `<code>` + one fenced python
//! block + `</code>`, or `<answer>…</answer>`. Generation stops at the first `</code>` or
//! `</answer>` (servers drop the stop string; [`close_turn`] puts it back). The environment
//! answers code with `<interpreter>\n…\n</interpreter>` in a user message; a turn that breaks
//! the format gets a corrective observation in the same shape.

/// Where model generation stops.
pub const STOP: [&str; 2] = ["</code>", "</answer>"];

/// What an assistant turn asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run this Python code.
    Code(String),
    /// The final answer.
    Answer(String),
    /// The turn breaks the format, for this reason.
    Invalid(String),
}

/// The reply text with the stop string restored: a reply that opened `<code>` or `<answer>`
/// and ended where generation stopped gets its closing tag back.
pub fn close_turn(text: &str) -> String {
    let text = text.trim_end();
    for (open, close) in [("<code>", "</code>"), ("<answer>", "</answer>")] {
        if let Some(at) = text.rfind(open)
            && !text[at..].contains(close)
        {
            return format!("{text}\n{close}").replace("\n\n</", "\n</");
        }
    }
    text.to_string()
}

/// Reads an assistant turn.
pub fn parse_action(turn: &str) -> Action {
    let turn = turn.trim();
    let Some(rest) = turn.strip_prefix("<think>") else {
        return Action::Invalid("the turn must start with <think>".into());
    };
    let Some(end) = rest.find("</think>") else {
        return Action::Invalid("<think> is not closed with </think>".into());
    };
    if rest[..end].trim().is_empty() {
        return Action::Invalid("<think> is empty".into());
    }
    let after = rest[end + "</think>".len()..].trim();
    if let Some(body) = inside(after, "code") {
        return match python_block(body) {
            Some(code) if !code.trim().is_empty() => Action::Code(code),
            _ => Action::Invalid("<code> must hold one ```python fenced block with code in it".into()),
        };
    }
    if let Some(answer) = inside(after, "answer") {
        return if answer.trim().is_empty() {
            Action::Invalid("<answer> is empty".into())
        } else {
            Action::Answer(answer.trim().to_string())
        };
    }
    Action::Invalid("after </think> comes either <code>…</code> or <answer>…</answer>".into())
}

/// The body of `text` when it is exactly `<tag>body</tag>`.
fn inside<'a>(text: &'a str, tag: &str) -> Option<&'a str> {
    let body = text.strip_prefix(&format!("<{tag}>"))?.strip_suffix(&format!("</{tag}>"))?;
    (!body.contains(&format!("<{tag}>"))).then_some(body)
}

/// The code of the single fenced block in `body` (```python or a bare ```).
fn python_block(body: &str) -> Option<String> {
    let body = body.trim();
    let rest =
        body.strip_prefix("```python").or_else(|| body.strip_prefix("```py")).or_else(|| body.strip_prefix("```"))?;
    let code = rest.strip_suffix("```")?;
    (!code.contains("```")).then(|| code.trim_matches('\n').to_string())
}

/// An assistant turn that runs `code` after thinking `think`.
pub fn code_turn(think: &str, code: &str) -> String {
    format!("<think>{think}</think>\n<code>\n```python\n{}\n```\n</code>", code.trim_end())
}

/// An assistant turn that answers `answer` after thinking `think`.
pub fn answer_turn(think: &str, answer: &str) -> String {
    format!("<think>{think}</think>\n<answer>{answer}</answer>")
}

/// The user message carrying an observation.
pub fn interpreter(observation: &str) -> String {
    format!("<interpreter>\n{observation}\n</interpreter>")
}

/// The observation for a turn that broke the format.
pub fn corrective(why: &str) -> String {
    format!(
        "Invalid action: {why}. Reply with <think>your reasoning</think> followed by either <code>\n```python\n# code\n```\n</code> to run code, or <answer>the final answer</answer>."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_and_answers_are_read() {
        let t = code_turn("Load it.", "df = pd.read_csv('data/a.csv')\nprint(df.shape)");
        assert_eq!(parse_action(&t), Action::Code("df = pd.read_csv('data/a.csv')\nprint(df.shape)".into()));
        assert_eq!(parse_action(&answer_turn("Done.", " 42 ")), Action::Answer("42".into()));
    }

    #[test]
    fn stop_strings_are_restored() {
        let cut = "<think>x</think>\n<code>\n```python\nprint(1)\n```\n";
        assert_eq!(close_turn(cut), "<think>x</think>\n<code>\n```python\nprint(1)\n```\n</code>");
        assert_eq!(parse_action(&close_turn(cut)), Action::Code("print(1)".into()));
        assert_eq!(close_turn("<think>x</think><answer>7"), "<think>x</think><answer>7\n</answer>");
        assert_eq!(close_turn("<think>x</think><answer>7</answer>"), "<think>x</think><answer>7</answer>");
    }

    #[test]
    fn broken_turns_say_why() {
        let why = |t: &str| match parse_action(t) {
            Action::Invalid(w) => w,
            other => panic!("{t:?} parsed as {other:?}"),
        };
        assert!(why("print(1)").contains("start with <think>"));
        assert!(why("<think>x").contains("not closed"));
        assert!(why("<think> </think><answer>1</answer>").contains("empty"));
        assert!(why("<think>x</think>\n<code>print(1)</code>").contains("fenced"));
        assert!(why("<think>x</think> the answer is 4").contains("either"));
        assert!(why("<think>x</think><code>\n```python\n```\n</code>").contains("fenced"));
        assert!(why("<think>x</think><code>```python\na\n```\n```python\nb\n```</code>").contains("fenced"));
        assert!(why("<think>x</think><answer>1</answer><answer>2</answer>").contains("either"));
    }
}
