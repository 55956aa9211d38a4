//! The evaluation's numbers: pass@1 and pass@k per model, overall and per group, the failure
//! modes, as counters, a Markdown report and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::Scored;

/// pass@1 (the mean over runs of the share of items right), pass@k (the share of items right
/// in any run) and the number of items, of `rows`; `right` says which rows count as right.
pub fn pass_rates(rows: &[&Scored], right: impl Fn(&Scored) -> bool) -> (f64, f64, usize) {
    let mut items: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for r in rows {
        let e = items.entry(&r.item).or_default();
        e.0 += 1;
        e.1 += u32::from(right(r));
    }
    if items.is_empty() {
        return (0.0, 0.0, 0);
    }
    let n = items.len() as f64;
    let pass1 = items.values().map(|(runs, ok)| f64::from(*ok) / f64::from(*runs)).sum::<f64>() / n;
    let passk = items.values().filter(|(_, ok)| *ok > 0).count() as f64 / n;
    (pass1, passk, items.len())
}

/// Rows by a key, keys in order.
fn by<'a>(rows: &[&'a Scored], key: impl Fn(&'a Scored) -> &'a str) -> BTreeMap<&'a str, Vec<&'a Scored>> {
    let mut out: BTreeMap<&str, Vec<&Scored>> = BTreeMap::new();
    for r in rows {
        out.entry(key(r)).or_default().push(r);
    }
    out
}

fn correct(r: &Scored) -> bool {
    r.correct
}

fn ppm(x: f64) -> u64 {
    (x * 1e6).round() as u64
}

/// The stage's counters: `items`, `pass_at_1_ppm`, `pass_at_k_ppm` and both per group
/// (`pass_at_1_ppm_<group>`); with several models, each name prefixed by `<model>.`.
pub fn counters(models: &[String], rows: &[Scored]) -> BTreeMap<String, u64> {
    let all: Vec<&Scored> = rows.iter().collect();
    let per_model = by(&all, |r| &r.model);
    let mut out = BTreeMap::new();
    for model in models {
        let prefix = if models.len() > 1 { format!("{model}.") } else { String::new() };
        let rows = per_model.get(model.as_str()).cloned().unwrap_or_default();
        let (p1, pk, n) = pass_rates(&rows, correct);
        out.insert(format!("{prefix}items"), n as u64);
        out.insert(format!("{prefix}pass_at_1_ppm"), ppm(p1));
        out.insert(format!("{prefix}pass_at_k_ppm"), ppm(pk));
        if rows.iter().any(|r| r.strict.is_some()) {
            let (s1, _, _) = pass_rates(&rows, |r| r.strict == Some(true));
            out.insert(format!("{prefix}execution_match_at_1_ppm"), ppm(s1));
        }
        for (group, rows) in by(&rows, |r| &r.group) {
            let (p1, pk, _) = pass_rates(&rows, correct);
            out.insert(format!("{prefix}pass_at_1_ppm_{group}"), ppm(p1));
            out.insert(format!("{prefix}pass_at_k_ppm_{group}"), ppm(pk));
        }
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// What the report says about the run as a whole.
pub struct About<'a> {
    /// The stage's name (the SVG's file name is `<stage>.report.svg`).
    pub stage: &'a str,
    /// The benchmark's format name.
    pub benchmark: &'a str,
    /// The models, in the order the pipeline lists them.
    pub models: &'a [String],
    /// Runs per item.
    pub runs: u32,
    /// Items skipped by the loader or for want of a judge, by reason.
    pub skipped: &'a BTreeMap<String, usize>,
}

/// The Markdown report: pass rates per model overall and per group (models side by side), the
/// failure modes, and the chart.
pub fn markdown(about: &About, rows: &[Scored]) -> String {
    let all: Vec<&Scored> = rows.iter().collect();
    let per_model = by(&all, |r| &r.model);
    let empty = Vec::new();
    let of = |m: &String| per_model.get(m.as_str()).unwrap_or(&empty);
    let k = about.runs;
    let mut md = format!("# Evaluation on {}\n\n", about.benchmark);
    let items = by(&all, |r| &r.item).len();
    let _ = writeln!(md, "{items} items, {k} runs each; pass@1 is the mean over runs, pass@{k} any of the runs.\n");
    for (why, n) in about.skipped {
        let _ = writeln!(md, "- skipped: {n} items, {why}");
    }
    let strict = rows.iter().any(|r| r.strict.is_some());
    md.push_str(if strict {
        "\n| model | items | pass@1 | pass@k | execution match@1 |\n| --- | ---: | ---: | ---: | ---: |\n"
    } else {
        "\n| model | items | pass@1 | pass@k |\n| --- | ---: | ---: | ---: |\n"
    });
    for m in about.models {
        let (p1, pk, n) = pass_rates(of(m), correct);
        let _ = write!(md, "| {m} | {n} | {} | {} |", pct(p1), pct(pk));
        if strict {
            let (s1, _, _) = pass_rates(of(m), |r| r.strict == Some(true));
            let _ = write!(md, " {} |", pct(s1));
        }
        md.push('\n');
    }
    md.push_str("\n## By group\n\n| group | items |");
    for m in about.models {
        let _ = write!(md, " {m} pass@1 | {m} pass@k |");
    }
    md.push_str("\n| --- | ---: |");
    md.push_str(&" ---: | ---: |".repeat(about.models.len()));
    md.push('\n');
    for (group, rows) in by(&all, |r| &r.group) {
        let n = by(&rows, |r| &r.item).len();
        let _ = write!(md, "| {group} | {n} |");
        for m in about.models {
            let mine: Vec<&Scored> = rows.iter().filter(|r| &r.model == m).copied().collect();
            let (p1, pk, _) = pass_rates(&mine, correct);
            let _ = write!(md, " {} | {} |", pct(p1), pct(pk));
        }
        md.push('\n');
    }
    md.push_str("\n## Failures (runs)\n\n| failure |");
    for m in about.models {
        let _ = write!(md, " {m} |");
    }
    md.push_str("\n| --- |");
    md.push_str(&" ---: |".repeat(about.models.len()));
    md.push('\n');
    for (failure, rows) in by(&all.iter().copied().filter(|r| r.failure.is_some()).collect::<Vec<_>>(), |r| {
        r.failure.as_deref().unwrap_or_default()
    }) {
        let _ = write!(md, "| {failure} |");
        for m in about.models {
            let _ = write!(md, " {} |", rows.iter().filter(|r| &r.model == m).count());
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\n![pass@1 by group]({}.report.svg)", about.stage);
    md
}

const COLORS: [&str; 6] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"];

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar chart of pass@1: one block per group (and one for all items), one bar per
/// model.
pub fn svg(about: &About, rows: &[Scored]) -> String {
    let all: Vec<&Scored> = rows.iter().collect();
    let mut blocks: Vec<(String, Vec<&Scored>)> = vec![("all items".into(), all.clone())];
    blocks.extend(by(&all, |r| &r.group).into_iter().map(|(g, rows)| (g.to_string(), rows)));
    let (label_w, bar_w, bar_h) = (180.0, 400.0, 14.0);
    let block_h = bar_h * about.models.len() as f64 + 10.0;
    let legend_h = 20.0 * about.models.len() as f64;
    let height = 40.0 + block_h * blocks.len() as f64 + legend_h + 10.0;
    let width = label_w + bar_w + 70.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    let _ = writeln!(s, "<text x=\"10\" y=\"20\" font-size=\"14\">pass@1 on {}</text>", escape(about.benchmark));
    let mut y = 35.0;
    for (label, rows) in &blocks {
        let _ = writeln!(s, "<text x=\"10\" y=\"{}\">{}</text>", y + bar_h, escape(label));
        for (i, m) in about.models.iter().enumerate() {
            let mine: Vec<&Scored> = rows.iter().filter(|r| &r.model == m).copied().collect();
            let (p1, _, _) = pass_rates(&mine, correct);
            let (w, yy) = (bar_w * p1, y + bar_h * i as f64);
            let _ = writeln!(
                s,
                "<rect x=\"{label_w}\" y=\"{yy}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                bar_h - 2.0,
                COLORS[i % COLORS.len()],
                label_w + w + 4.0,
                yy + bar_h - 3.0,
                pct(p1)
            );
        }
        y += block_h;
    }
    for (i, m) in about.models.iter().enumerate() {
        let yy = y + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{label_w}\" y=\"{yy}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            COLORS[i % COLORS.len()],
            label_w + 18.0,
            yy + 11.0,
            escape(m)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, item: &str, group: &str, correct: bool) -> Scored {
        Scored {
            row_id: String::new(),
            parent_ids: Vec::new(),
            model: model.into(),
            benchmark: "dabench".into(),
            item: item.into(),
            group: group.into(),
            run: 0,
            answer: None,
            correct,
            grader: "value".into(),
            reason: String::new(),
            strict: None,
            failure: (!correct).then(|| "wrong".into()),
            turns: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
            seconds: 0.0,
        }
    }

    #[test]
    fn pass_at_1_is_the_mean_over_runs_and_pass_at_k_any_run() {
        let rows = [
            row("m", "a", "easy", true),
            row("m", "a", "easy", false),
            row("m", "a", "easy", false),
            row("m", "b", "hard", false),
            row("m", "b", "hard", false),
            row("m", "b", "hard", false),
        ];
        let refs: Vec<&Scored> = rows.iter().collect();
        let (p1, pk, n) = pass_rates(&refs, correct);
        assert_eq!(n, 2);
        assert!((p1 - 1.0 / 6.0).abs() < 1e-12, "{p1}");
        assert!((pk - 0.5).abs() < 1e-12);
        assert_eq!(pass_rates(&[], correct), (0.0, 0.0, 0));
        let models = vec!["m".to_string()];
        let skipped = BTreeMap::from([("Visualization (as in the recipe)".to_string(), 3)]);
        let about = About { stage: "eval", benchmark: "dabench", models: &models, runs: 3, skipped: &skipped };
        let md = markdown(&about, &rows);
        assert!(md.contains("2 items, 3 runs each"), "{md}");
        assert!(md.contains("| m | 2 | 16.7% | 50.0% |"), "{md}");
        assert!(md.contains("| easy | 1 | 33.3% | 100.0% |"), "{md}");
        assert!(md.contains("| wrong | 5 |"), "{md}");
        assert!(md.contains("- skipped: 3 items, Visualization"), "{md}");
        let c = counters(&models, &rows);
        assert_eq!((c["pass_at_1_ppm"], c["pass_at_k_ppm"], c["pass_at_k_ppm_hard"]), (166_667, 500_000, 0));
    }

    #[test]
    fn several_models_side_by_side() {
        let rows = [row("base", "a", "easy", false), row("tuned", "a", "easy", true)];
        let models = vec!["base".to_string(), "tuned".to_string()];
        let skipped = BTreeMap::new();
        let about = About { stage: "eval", benchmark: "qrdata", models: &models, runs: 1, skipped: &skipped };
        let md = markdown(&about, &rows);
        assert!(md.contains("| base | 1 | 0.0% | 0.0% |\n| tuned | 1 | 100.0% | 100.0% |"), "{md}");
        assert!(md.contains("| easy | 1 | 0.0% | 0.0% | 100.0% | 100.0% |"), "{md}");
        assert!(md.contains("| wrong | 1 | 0 |"), "{md}");
        let c = counters(&models, &rows);
        assert_eq!((c["base.pass_at_1_ppm"], c["tuned.pass_at_1_ppm"]), (0, 1_000_000));
        let chart = svg(&about, &rows);
        assert!(
            chart.starts_with("<svg") && chart.contains(">tuned</text>") && chart.contains("width=\"400.0\""),
            "{chart}"
        );
    }
}
