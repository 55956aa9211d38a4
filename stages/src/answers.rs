//! Whether two answers to a data question agree: numbers within a relative tolerance, text
//! compared after normalisation. Used by the judge's gold check (and by evaluation).

/// `answer` with what kiln or the protocol adds around the value removed: a trailing
/// `(result saved in x.csv)`, surrounding quotes or backticks, a final period.
fn core(answer: &str) -> &str {
    let a = answer.trim();
    let a = match a.rfind(" (result saved in ") {
        Some(at) if a.ends_with(')') => &a[..at],
        _ => a,
    };
    a.trim().trim_end_matches('.').trim_matches(|c| matches!(c, '`' | '"' | '\'' | '*')).trim()
}

/// Lower case, punctuation dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_alphanumeric() || c == '.' || c == '-' { c.to_ascii_lowercase() } else { ' ' })
        .collect();
    cleaned.split_whitespace().map(|w| w.trim_matches('.')).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Every number written in `text` (thousands separators allowed, percent signs ignored).
pub fn numbers(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut current = String::new();
    let flush = |current: &mut String, out: &mut Vec<f64>| {
        let cleaned = current.replace(',', "");
        let cleaned = cleaned.trim_end_matches(['.', ',']);
        if let Ok(x) = cleaned.parse::<f64>()
            && x.is_finite()
        {
            out.push(x);
        }
        current.clear();
    };
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let starts_number = c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) && current.is_empty();
        let continues = !current.is_empty() && (c == '.' || c == ',' || c == 'e' || c == 'E');
        if c.is_ascii_digit() || starts_number || continues {
            current.push(c);
        } else {
            flush(&mut current, &mut out);
        }
    }
    flush(&mut current, &mut out);
    out
}

/// True when `answer` agrees with `gold`: for a numeric gold, some number of the answer is
/// within `tolerance` (relative) of it; otherwise the normalised texts are equal, or the gold
/// appears in the answer as whole words.
pub fn agree(answer: &str, gold: &str, tolerance: f64) -> bool {
    let (answer, gold) = (core(answer), core(gold));
    if let Ok(g) = gold.replace(',', "").parse::<f64>() {
        return numbers(answer).iter().any(|a| (a - g).abs() <= tolerance * g.abs().max(1e-9) || (a - g).abs() < 1e-9);
    }
    let (a, g) = (normalize(answer), normalize(gold));
    !g.is_empty() && (a == g || format!(" {a} ").contains(&format!(" {g} ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_agree_within_tolerance() {
        assert!(agree("42", "42", 0.0));
        assert!(agree("The average is 12.47 kg.", "12.5", 0.03));
        assert!(!agree("The average is 11", "12.5", 0.03));
        assert!(agree("1,234.5", "1234.5", 1e-6));
        assert!(agree("-0.0871 (result saved in result.csv)", "-0.0871", 1e-6));
        assert!(agree("43.0", "43", 0.0));
        assert_eq!(numbers("from -3 to 4.5, 10%, 1e3"), vec![-3.0, 4.5, 10.0, 1000.0]);
    }

    #[test]
    fn text_agrees_after_normalisation() {
        assert!(agree("Yes.", "Yes", 0.03));
        assert!(agree("**Lyon** has the highest average", "Lyon", 0.03));
        assert!(agree("n / a", "n / a", 0.03));
        assert!(!agree("No", "Yes", 0.03));
        assert!(!agree("Lyonnais", "Lyon", 0.03));
        assert!(agree("`temp` (result saved in result.csv)", "temp", 0.03));
    }
}
