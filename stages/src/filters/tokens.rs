//! Token counts: exact with a Hugging Face `tokenizer.json` (the `tokenizers` crate), or a
//! documented approximation without one.
//!
//! The approximation counts, for BPE tokenizers of English-and-code text, about what they
//! produce: each run of letters or digits is one token per 4 characters (rounded up), each
//! other visible character (punctuation, symbols) one token, and each CJK character one token.
//! It overestimates slightly on plain English, which errs on the safe side of a length limit.

use std::path::Path;

/// Counts tokens.
pub enum TokenCounter {
    /// The approximation described in the module documentation.
    Approximate,
    /// A real tokenizer.
    Tokenizer(Box<tokenizers::Tokenizer>),
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenCounter::Approximate => "TokenCounter::Approximate",
            TokenCounter::Tokenizer(_) => "TokenCounter::Tokenizer",
        })
    }
}

impl TokenCounter {
    /// The tokenizer in `path`, or the approximation when there is none.
    pub fn load(path: Option<&Path>) -> Result<Self, crate::StageError> {
        match path {
            None => Ok(TokenCounter::Approximate),
            Some(p) => tokenizers::Tokenizer::from_file(p)
                .map(|t| TokenCounter::Tokenizer(Box::new(t)))
                .map_err(|e| crate::StageError::invalid(p, format!("not a usable tokenizer.json ({e})"))),
        }
    }

    /// Tokens in `text` (no special tokens added).
    pub fn count(&self, text: &str) -> usize {
        match self {
            TokenCounter::Tokenizer(t) => t.encode(text, false).map(|e| e.len()).unwrap_or_else(|_| approximate(text)),
            TokenCounter::Approximate => approximate(text),
        }
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

/// The approximation of the module documentation.
pub fn approximate(text: &str) -> usize {
    let (mut tokens, mut run) = (0usize, 0usize);
    for c in text.chars() {
        if c.is_alphanumeric() && !is_cjk(c) {
            run += 1;
            continue;
        }
        tokens += run.div_ceil(4);
        run = 0;
        if !c.is_whitespace() {
            tokens += 1;
        }
    }
    tokens + run.div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximation_counts_words_symbols_and_cjk() {
        assert_eq!(approximate(""), 0);
        assert_eq!(approximate("The mean is 42.5"), 1 + 1 + 1 + 1 + 1 + 1);
        assert_eq!(approximate("internationalisation"), 5);
        assert_eq!(approximate("答案是42"), 3 + 1);
    }
}
