//! The binary off a terminal: logs written to a pipe carry no colour codes; on a terminal (a
//! pseudo-terminal made by util-linux `script`) they are coloured, unless `NO_COLOR` is set.

mod util;

use std::path::Path;
use std::process::Command;

/// True when `text` holds a colour (SGR) escape sequence, `ESC [ digits ; ... m`; cursor
/// movements of progress bars are not colour.
fn coloured(text: &str) -> bool {
    text.split("\u{1b}[").skip(1).any(|rest| {
        let params = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';').len();
        rest[params..].starts_with('m')
    })
}

/// A one-stage pipeline in `dir` that logs at info level when run.
fn pipeline(dir: &Path) {
    std::fs::write(dir.join("rows.jsonl"), "{\"question\": \"a\"}\n{\"question\": \"b\"}\n").unwrap();
    std::fs::write(
        dir.join("p.toml"),
        "[pipeline]\nname = \"t\"\noutput_dir = \"out\"\n\n[stages.rows]\nkind = \"load\"\npaths = [\"rows.jsonl\"]\n",
    )
    .unwrap();
}

#[test]
fn colour_codes_are_told_from_cursor_movements() {
    assert!(coloured("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO"));
    assert!(!coloured("\u{1b}[2K\u{1b}[1A plain"));
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let tmp = tempfile::tempdir().unwrap();
    pipeline(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "p.toml"])
        .current_dir(tmp.path())
        .env("KILN_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", util::text(&out.stderr));
    let logs = util::text(&out.stderr);
    assert!(logs.contains("INFO"), "the run logs at info level:\n{logs}");
    assert!(!logs.contains('\u{1b}'), "no escape codes in piped logs:\n{logs:?}");
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let tmp = tempfile::tempdir().unwrap();
    pipeline(tmp.path());
    // `script` runs the command on a pseudo-terminal and copies what it printed to stdout.
    let on_terminal = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &format!("{} run --force p.toml", env!("CARGO_BIN_EXE_kiln")), "/dev/null"])
            .current_dir(tmp.path())
            .env("KILN_LOG", "info")
            .env_remove("NO_COLOR");
        if let Some(value) = no_color {
            cmd.env("NO_COLOR", value);
        }
        let out = cmd.output().expect("util-linux `script` runs");
        assert!(out.status.success(), "{}", util::text(&out.stdout));
        util::text(&out.stdout)
    };
    let default = on_terminal(None);
    assert!(default.contains("INFO") && coloured(&default), "colour on a terminal:\n{default:?}");
    let plain = on_terminal(Some("1"));
    assert!(plain.contains("INFO") && !coloured(&plain), "NO_COLOR=1 turns colour off:\n{plain:?}");
}
