//! One value: numbers within a relative tolerance, text after normalisation, multiple choice.

use super::Grade;

/// `answer` with what kiln or the protocol adds around the value removed: a trailing
/// `(result saved in x.csv)`, surrounding quotes, backticks or bold marks, a final period.
pub(super) fn core(answer: &str) -> &str {
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

/// Every number written in `text`, in order (thousands separators allowed, percent signs
/// ignored).
pub(super) fn numbers(text: &str) -> Vec<f64> {
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

/// The number a value is, if it is one: `1,234.5`, `-3`, `69.75%`.
pub(super) fn as_number(value: &str) -> Option<f64> {
    let v = core(value).trim_end_matches('%').replace(',', "");
    v.trim().parse::<f64>().ok().filter(|x| x.is_finite())
}

/// The last number of `answer`: agents state the value last ("the mean is 42.67").
pub fn final_number(answer: &str) -> Option<f64> {
    numbers(core(answer)).last().copied()
}

/// True when `got` is within `tolerance` (relative) of `want`.
pub(super) fn close(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= tolerance * want.abs() || (got - want).abs() < 1e-9
}

/// One value: a numeric gold against the answer's final number, a list gold (`a, b and c`)
/// as a set of items, any other text gold against the whole answer after normalisation.
pub(super) fn grade(answer: &str, gold: &str, tolerance: f64) -> Grade {
    if let Some(want) = as_number(gold) {
        return match final_number(answer) {
            None => Grade::fail(format!("no number in the answer; expected {gold}")),
            Some(got) if close(got, want, tolerance) => Grade::pass(format!("{got} matches {gold}")),
            Some(got) => Grade::fail(format!("{got} is not {gold} (tolerance {tolerance})")),
        };
    }
    let wanted = items(gold);
    if wanted.len() > 1 {
        return list(answer, gold, &wanted, tolerance);
    }
    let (got, want) = (normalize(core(answer)), normalize(core(gold)));
    if !want.is_empty() && got == want {
        Grade::pass(format!("{:?} matches {gold:?}", core(answer)))
    } else {
        Grade::fail(format!("{:?} is not {gold:?}", core(answer)))
    }
}

/// The items of a list written `a, b and c` (or one per line, or with semicolons).
fn items(text: &str) -> Vec<String> {
    core(text)
        .replace(" and ", ",")
        .split([',', ';', '\n'])
        .map(|item| core(item).to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

/// A list gold: the answer's items are the gold's, in any order, each number within `tolerance`
/// and each text equal after normalisation; nothing missing, nothing extra.
fn list(answer: &str, gold: &str, wanted: &[String], tolerance: f64) -> Grade {
    let got = items(answer);
    let same = |a: &str, b: &str| match (as_number(a), as_number(b)) {
        (Some(x), Some(y)) => close(x, y, tolerance),
        _ => !normalize(b).is_empty() && normalize(a) == normalize(b),
    };
    if got.len() != wanted.len() {
        return Grade::fail(format!("{} items, expected the {} of {gold:?}", got.len(), wanted.len()));
    }
    let mut used = vec![false; got.len()];
    for want in wanted {
        match (0..got.len()).find(|&i| !used[i] && same(&got[i], want)) {
            Some(i) => used[i] = true,
            None => return Grade::fail(format!("{want:?} of {gold:?} is not in the answer")),
        }
    }
    Grade::pass(format!("the {} items of {gold:?}, in any order", wanted.len()))
}

/// Multiple choice: the answer is the right option's letter (alone, or as `B.`, `(B)`,
/// `option B`), or the right option's text.
pub(super) fn choice(answer: &str, letter: char, options: &[(char, String)]) -> Grade {
    let answer = core(answer);
    let words: Vec<&str> = answer.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let letters: Vec<char> = words
        .iter()
        .filter(|w| w.len() == 1)
        .filter_map(|w| w.chars().next().filter(|c| options.iter().any(|(l, _)| l == c)))
        .collect();
    let picked = match letters.as_slice() {
        [one] => Some(*one),
        _ => {
            let text = normalize(answer);
            let named: Vec<char> =
                options.iter().filter(|(_, t)| !t.is_empty() && normalize(t) == text).map(|(l, _)| *l).collect();
            named.first().copied()
        }
    };
    match picked {
        Some(l) if l == letter => Grade::pass(format!("option {l}")),
        Some(l) => Grade::fail(format!("option {l}, not {letter}")),
        None => Grade::fail(format!("no single option in {answer:?}; expected {letter}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_use_the_final_one_within_tolerance() {
        assert!(grade("42", "42", 0.0).correct);
        assert!(grade("The average is 12.47 kg.", "12.5", 0.03).correct);
        assert!(!grade("The average is 11", "12.5", 0.03).correct);
        assert!(grade("1,234.5", "1234.5", 1e-6).correct);
        assert!(grade("-0.0871 (result saved in result.csv)", "-0.0871", 1e-6).correct);
        assert!(grade("69.75", "69.75%", 0.0).correct);
        assert!(!grade("12.5 is wrong; it is 20", "12.5", 0.03).correct, "only the final number counts");
        assert!(!grade("about 12.9", "12.5", 0.03).correct, "3.2% off is a near miss");
        assert_eq!(grade("none", "3", 0.0).reason, "no number in the answer; expected 3");
        assert_eq!(numbers("from -3 to 4.5, 10%, 1e3"), vec![-3.0, 4.5, 10.0, 1000.0]);
    }

    #[test]
    fn text_must_be_the_same_after_normalisation() {
        assert!(grade("Yes.", "Yes", 0.03).correct);
        assert!(grade("**Lyon**", "lyon", 0.03).correct);
        assert!(grade("`temp` (result saved in result.csv)", "temp", 0.03).correct);
        assert!(!grade("Yes and no", "Yes", 0.03).correct);
        assert!(!grade("Lyon has the highest average", "Lyon", 0.03).correct);
        assert!(!grade("Lyonnais", "Lyon", 0.03).correct);
        assert!(!grade("", "", 0.03).correct, "an empty gold matches nothing");
    }

    #[test]
    fn lists_are_sets() {
        assert!(grade("Paris, Lyon", "Lyon, Paris", 0.03).correct);
        assert!(grade("Paris and lyon.", "Lyon; Paris", 0.03).correct);
        assert!(grade("12.4, 7", "7, 12.5", 0.03).correct, "numbers within the tolerance");
        assert_eq!(grade("Paris", "Lyon, Paris", 0.03).reason, "1 items, expected the 2 of \"Lyon, Paris\"");
        assert!(!grade("Paris, Lyon, Nice", "Lyon, Paris", 0.03).correct, "nothing extra");
        assert!(!grade("Paris, Paris", "Lyon, Paris", 0.03).correct, "each item once");
        assert!(grade("1,234", "1234", 0.0).correct, "a thousands separator is not a list");
    }

    #[test]
    fn choices_by_letter_or_text() {
        let options = vec![('A', "1985".to_string()), ('B', "1995".to_string())];
        assert!(choice("A", 'A', &options).correct);
        assert!(choice("The answer is (A).", 'A', &options).correct);
        assert!(choice("1985", 'A', &options).correct);
        assert!(!choice("B", 'A', &options).correct);
        assert!(!choice("A or B", 'A', &options).correct, "hedging between options is not an answer");
        assert!(!choice("I cannot tell", 'A', &options).correct);
    }
}
