//! The scripted teacher: offline trajectories for `programmatic` questions. It inspects the
//! data, runs pandas code equivalent to the question's solving query in the sandbox, and
//! answers with the last line the code really printed. Its turns follow the same protocol
//! (and pass the same checks) as a model's.

use serde_json::Value;

use super::protocol::{answer_turn, code_turn};

/// The turns of one scripted trajectory: code turns, then an answer read from the output.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Script {
    /// (think, code) for each code turn, in order.
    pub steps: Vec<(String, String)>,
    /// For SQL tasks, the result CSV the answer names (RECIPE section 5).
    pub result_csv: Option<String>,
    /// A SQL task solved in pandas: before answering, the value is saved as the result table by
    /// a SELECT of it, so the result CSV holds the answering row, not the table analysed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub answer_table: bool,
}

impl Script {
    /// The assistant turn after `done` code turns; `last_output` is the latest observation.
    /// `None` once the script has nothing sensible left to say (the last cell failed).
    pub fn turn(&self, done: usize, last_output: Option<&str>, last_failed: bool) -> Option<String> {
        if last_failed {
            return None;
        }
        if let Some((think, code)) = self.steps.get(done) {
            return Some(code_turn(think, code));
        }
        let value = last_output?.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
        if self.answer_table && done == self.steps.len() {
            let select = format!("SELECT {} AS answer", sql_literal(value));
            return Some(code_turn(
                &format!("The answer is {value}. I save it as the result table with a SELECT of that value."),
                &format!(
                    "result = execute_sql(sql={}, output_path='result.csv')\nprint(result.iloc[0, 0])",
                    py(&select)
                ),
            ));
        }
        let think = format!("The code printed the result on its last line: {value}.");
        Some(match &self.result_csv {
            Some(csv) => answer_turn(&think, &format!("{value} (result saved in {csv})")),
            None => answer_turn(&think, value),
        })
    }
}

/// A SQL literal: a number as it is, anything else quoted.
fn sql_literal(value: &str) -> String {
    match value.parse::<f64>() {
        Ok(x) if x.is_finite() => value.to_string(),
        _ => format!("'{}'", value.replace('\'', "''")),
    }
}

/// A Python string literal.
fn py(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "''".into())
}

/// Categories whose generated query runs unchanged in SQLite (the others use functions
/// SQLite lacks, such as STDDEV, MEDIAN or CORR, and are solved with pandas instead).
const SQLITE_QUERIES: &[&str] = &[
    "aggregation",
    "ranking",
    "counting",
    "comparison",
    "arithmetic_calculation",
    "descriptive_analysis",
    "fact_checking",
    "multi_hop_numerical_reasoning",
    "feature_engineering",
    "comprehensive_data_preprocessing",
];

/// The script for a question of `category` with the generator's `params` (and solving
/// `query`), on `table` of the file shown as `file` (`data/<name>`) in format `format`.
/// `None` for what it cannot solve.
pub fn script(
    category: &str,
    params: &Value,
    query: Option<&str>,
    format: &str,
    file: &str,
    table: &str,
) -> Option<Script> {
    let mut steps = Vec::new();
    let look = "print(df.shape)\nprint(df.head())";
    match format {
        "csv" => steps.push((
            format!("I will load {file} with pandas and look at its size and first rows."),
            format!("df = pd.read_csv({})\n{look}", py(file)),
        )),
        "tsv" => steps.push((
            format!("I will load the tab-separated file {file} and look at its first rows."),
            format!("df = pd.read_csv({}, sep='\\t')\n{look}", py(file)),
        )),
        "xlsx" => steps.push((
            format!("I will load the sheet {table} of {file} and look at its first rows."),
            format!("df = pd.read_excel({}, sheet_name={})\n{look}", py(file), py(table)),
        )),
        "sqlite" => {
            steps.push(("This is a SQLite task: first I look at the schema.".into(), "print(get_db_info())".into()));
            if let Some(query) = query.filter(|_| SQLITE_QUERIES.contains(&category)) {
                steps.push((
                    format!("The {table} table has what the question needs: one SELECT answers it."),
                    format!(
                        "result = execute_sql(sql={}, output_path='result.csv')\nprint(result)\nprint(result.iloc[0, 0])",
                        py(query)
                    ),
                ));
                return Some(Script { steps, result_csv: Some("result.csv".into()), answer_table: false });
            }
            let csv = format!("{}.csv", table.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            steps.push((
                format!("I will fetch the {table} table with a SELECT and analyse it with pandas."),
                format!(
                    "df = execute_sql(sql={}, output_path={})\n{look}",
                    py(&format!("SELECT * FROM \"{}\"", table.replace('"', "\"\""))),
                    py(&csv)
                ),
            ));
            steps.push(solve(category, params)?);
            return Some(Script { steps, result_csv: Some("result.csv".into()), answer_table: true });
        }
        _ => return None,
    }
    steps.push(solve(category, params)?);
    Some(Script { steps, result_csv: None, answer_table: false })
}

/// The solving step: (think, code) whose last printed line is the answer.
fn solve(category: &str, p: &Value) -> Option<(String, String)> {
    let s = |k: &str| p.get(k).and_then(Value::as_str).map(py);
    let num = |col: &str| format!("pd.to_numeric(df[{col}], errors='coerce')");
    let round = "value = round(float(value), 4)\nprint(int(value) if value.is_integer() else value)";
    let (think, code) = match category {
        "aggregation" => {
            let (col, op) = (s("column")?, p.get("op")?.as_str()?);
            let f = if op == "total" { "sum" } else { "mean" };
            (format!("I need the {op} of {col}, as a number."), format!("value = {}.{f}()\n{round}", num(&col)))
        }
        "ranking" => {
            let (g, c) = (s("group")?, s("column")?);
            (
                format!("I group by {g}, average {c}, and take the group with the highest mean."),
                format!(
                    "sub = df[[{g}, {c}]].copy()\nsub[{c}] = pd.to_numeric(sub[{c}], errors='coerce')\nmeans = sub.dropna().groupby({g})[{c}].mean().sort_values(ascending=False)\nprint(means.head())\nprint(means.index[0])"
                ),
            )
        }
        "counting" => {
            let (c, v) = (s("column")?, s("value")?);
            (
                format!("I count the rows whose {c} equals {v}."),
                format!("print(int((df[{c}].astype(str) == {v}).sum()))"),
            )
        }
        "comparison" => {
            let (g, c, a, b) = (s("group")?, s("column")?, s("a")?, s("b")?);
            (
                format!("I compare the mean {c} of the rows where {g} is {a} with those where it is {b}."),
                format!(
                    "vals = {}\nkey = df[{g}].astype(str)\nmean_a, mean_b = vals[key == {a}].mean(), vals[key == {b}].mean()\nprint(mean_a, mean_b)\nprint('Yes' if mean_a > mean_b else 'No')",
                    num(&c)
                ),
            )
        }
        "statistical_analysis" => {
            let (c, op) = (s("column")?, p.get("op")?.as_str()?);
            let f = if op == "median" { "median()" } else { "std()" };
            (format!("I compute the {op} of {c}."), format!("value = {}.{f}\n{round}", num(&c)))
        }
        "correlation_analysis" => {
            let (a, b) = (s("a")?, s("b")?);
            (
                format!("I compute the Pearson correlation of {a} and {b} over rows where both are present."),
                format!(
                    "sub = df[[{a}, {b}]].apply(pd.to_numeric, errors='coerce').dropna()\nvalue = sub[{a}].corr(sub[{b}])\n{round}"
                ),
            )
        }
        "arithmetic_calculation" => {
            let c = s("column")?;
            (
                format!("I subtract the smallest {c} from the largest."),
                format!("vals = {}\nvalue = vals.max() - vals.min()\n{round}", num(&c)),
            )
        }
        "descriptive_analysis" => {
            let c = s("column")?;
            (format!("I count the distinct non-missing values of {c}."), format!("print(df[{c}].nunique())"))
        }
        "anomaly_detection" => {
            let c = s("column")?;
            (
                format!("I count the values of {c} more than 2 sample standard deviations from the mean."),
                format!(
                    "vals = {}\noutliers = (vals - vals.mean()).abs() > 2 * vals.std()\nprint(int(outliers.sum()))",
                    num(&c)
                ),
            )
        }
        "distribution_analysis" => {
            let c = s("column")?;
            (
                format!("I compute the population skewness of {c}: the mean cubed z-score."),
                format!(
                    "vals = {}.dropna()\nz = (vals - vals.mean()) / vals.std(ddof=0)\nvalue = (z ** 3).mean()\n{round}",
                    num(&c)
                ),
            )
        }
        "fact_checking" => {
            let (c, t) = (s("column")?, p.get("threshold")?.as_f64()?);
            (
                format!("I compare the mean of {c} with {t}."),
                format!("mean = {}.mean()\nprint(mean)\nprint('True' if mean > {t} else 'False')", num(&c)),
            )
        }
        "multi_hop_numerical_reasoning" => {
            let (g, c) = (s("group")?, s("column")?);
            (
                format!("First I find the most frequent {g}, then the mean {c} over its rows."),
                format!(
                    "top = df[{g}].value_counts().idxmax()\nprint('most frequent:', top)\nvalue = {}[df[{g}] == top].mean()\n{round}",
                    num(&c)
                ),
            )
        }
        "time_based_calculation" => {
            let c = s("column")?;
            if p.get("kind")?.as_str()? == "days" {
                (
                    format!("I parse {c} as dates and count the days between the earliest and the latest."),
                    format!(
                        "dates = pd.to_datetime(df[{c}], errors='coerce')\nprint((dates.max() - dates.min()).days)"
                    ),
                )
            } else {
                (
                    format!("I count rows per {c} and take the busiest."),
                    format!("print(df[{c}].value_counts().idxmax())"),
                )
            }
        }
        "feature_engineering" => {
            let (a, b) = (s("a")?, s("b")?);
            (
                format!("I add the ratio {a} / {b} where both are present and {b} is not zero, then average it."),
                format!(
                    "sub = df[[{a}, {b}]].apply(pd.to_numeric, errors='coerce').dropna()\nsub = sub[sub[{b}] != 0]\nsub['ratio'] = sub[{a}] / sub[{b}]\nvalue = sub['ratio'].mean()\n{round}"
                ),
            )
        }
        "comprehensive_data_preprocessing" => {
            let c = s("column")?;
            (
                format!("I drop rows with a missing {c}, then exact duplicate rows, and count what remains."),
                format!("clean = df.dropna(subset=[{c}]).drop_duplicates()\nprint(len(clean))"),
            )
        }
        _ => return None,
    };
    Some((think, code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{Action, parse_action};

    #[test]
    fn scripts_follow_the_protocol_and_answer_from_output() {
        let p = serde_json::json!({"op": "average", "column": "sales \"q1\""});
        let s = script("aggregation", &p, None, "csv", "data/a.csv", "a").unwrap();
        assert_eq!(s.steps.len(), 2);
        let first = s.turn(0, None, false).unwrap();
        assert!(matches!(parse_action(&first), Action::Code(c) if c.starts_with("df = pd.read_csv(\"data/a.csv\")")));
        let second = s.turn(1, Some("(3, 2)"), false).unwrap();
        assert!(matches!(parse_action(&second), Action::Code(c) if c.contains("df[\"sales \\\"q1\\\"\"]")));
        assert_eq!(parse_action(&s.turn(2, Some("12.5\n\n"), false).unwrap()), Action::Answer("12.5".into()));
        assert_eq!(s.turn(2, Some("x"), true), None);
        assert!(script("aggregation", &p, None, "parquet", "data/a.parquet", "a").is_none());
        let counting = serde_json::json!({"column": "c", "value": "v"});
        let by_sql = script("counting", &counting, Some("SELECT COUNT(*) FROM t"), "sqlite", "db", "t").unwrap();
        assert_eq!(by_sql.steps.len(), 2);
        assert!(by_sql.steps[1].1.contains("execute_sql(sql=\"SELECT COUNT(*) FROM t\", output_path='result.csv')"));
        assert!(by_sql.turn(2, Some("4"), false).unwrap().contains("<answer>4 (result saved in result.csv)</answer>"));
        let stats = serde_json::json!({"op": "median", "column": "c"});
        let by_pandas =
            script("statistical_analysis", &stats, Some("SELECT MEDIAN(c) FROM t"), "sqlite", "db", "t").unwrap();
        assert_eq!(by_pandas.steps.len(), 3);
        // The value pandas printed becomes the result table, by a SELECT of it, then the answer.
        let save = by_pandas.turn(3, Some("(10, 2)\n2.5\n"), false).unwrap();
        assert!(
            matches!(parse_action(&save), Action::Code(c) if c.contains("execute_sql(sql=\"SELECT 2.5 AS answer\", output_path='result.csv')")),
            "{save}"
        );
        let answer = by_pandas.turn(4, Some("2.5"), false).unwrap();
        assert_eq!(parse_action(&answer), Action::Answer("2.5 (result saved in result.csv)".into()));
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_literal("-3e2"), "-3e2");
    }
}
