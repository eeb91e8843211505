//! The README must not rot: its quick start runs, block by block, against a real server on
//! a temporary data directory, and its charts are exactly what their data files draw.

#[path = "../benches/support/plot.rs"]
mod plot;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::model_path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The ```sh blocks between `<!-- quickstart -->` and `<!-- /quickstart -->`.
fn quickstart_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find("<!-- quickstart -->")
        .expect("README.md has a <!-- quickstart --> marker");
    let end = start
        + readme[start..]
            .find("<!-- /quickstart -->")
            .expect("README.md has a <!-- /quickstart --> marker");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme[start..end].lines() {
        match current.as_mut() {
            None if line.trim_start().starts_with("```sh") => current = Some(String::new()),
            None => {}
            Some(_) if line.trim() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(
        current.is_none(),
        "an unclosed ```sh block in the quick start"
    );
    blocks
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().unwrap().port()
}

#[test]
fn chart_csv_round_trip_and_units() {
    let mut chart = plot::Chart::lines("T, with comma", "x", "y");
    chart.log_y = true;
    chart.y_unit = plot::Unit::Seconds;
    chart.dashed = vec!["llama.cpp".into()];
    chart.push("starkv, cold", 2000.0, 0.5);
    chart.push("starkv, cold", 8000.0, 0.657);
    chart.push("llama.cpp re-prefill", 8000.0, 57.99);
    let parsed = plot::Chart::from_csv(&chart.to_csv()).unwrap();
    assert_eq!(parsed, chart);
    assert!(plot::Chart::from_csv("series,x,y\na,1,zz\n").is_err());
    assert!(plot::Chart::from_csv("# colour: red\nseries,x,y\na,1,2\n").is_err());
    assert!(plot::Chart::from_csv("# title: empty\nseries,x,y\n").is_err());
    let svg = plot::render_svg(&chart).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for text in ["starkv, cold", "llama.cpp re-prefill", "10 s"] {
        assert!(svg.contains(text), "the chart lacks `{text}`");
    }
    assert_eq!(plot::Unit::Tokens.format(131_072.0), "128K");
    assert_eq!(plot::Unit::Tokens.format(7996.0), "7996");
    assert_eq!(plot::Unit::Seconds.format(0.368), "0.368 s");
    assert_eq!(plot::Unit::Seconds.format(57.99), "58 s");
    assert_eq!(plot::Unit::Rate.format(222_289.0), "222k");
    assert_eq!(plot::Unit::Percent.format(60.7), "60.7%");
    assert_eq!(plot::Unit::Plain.format(1.5), "1.5");
    assert_eq!(plot::Unit::Plain.format(100.0), "100");
}

#[test]
fn quick_start_blocks_are_found() {
    let text = "x\n<!-- quickstart -->\n```sh\na\nb\n```\ntext\n```text\nnot run\n```\n```sh\nc\n```\n<!-- /quickstart -->\n```sh\nafter\n```\n";
    assert_eq!(quickstart_blocks(text), vec!["a\nb\n", "c\n"]);
}

/// Every quick-start command, in order, in one bash with `set -euo pipefail`: the server
/// the README starts gets a free port (the README's 127.0.0.1:8700 is replaced), the
/// test's data directory and the already-fetched default model through the environment
/// variables the commands read; `starkv` is the binary under test.
#[test]
fn readme_quick_start_runs_against_a_real_server() {
    let blocks = quickstart_blocks(&readme());
    assert!(blocks.len() >= 4, "quick start blocks: {blocks:?}");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let script = blocks.join("\n");
    assert!(
        script.contains("127.0.0.1:8700"),
        "the quick start talks to the default address"
    );
    let script = script.replace("127.0.0.1:8700", &address);
    let data_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("readme-quickstart");
    let _ = std::fs::remove_dir_all(&data_dir);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_starkv")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A server left behind would keep the output pipe open: stop every job on exit.
    let prelude = "set -euo pipefail\n\
                   trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n\
                   trap 'exit 143' TERM INT\n";
    let out = Command::new("timeout")
        .args(["1200", "bash", "-c", &format!("{prelude}{script}")])
        .current_dir(repo())
        .env("PATH", &path)
        .env("STARKV_DATA_DIR", &data_dir)
        .env("STARKV_MODEL", model_path())
        .env("STARKV_LISTEN", &address)
        .env_remove("STARKV_SERVER")
        .env_remove("STARKV_API_KEY")
        .env_remove("STARKV_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("bash and timeout");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quick start failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    let has_line = |what: &str, f: &dyn Fn(&str) -> bool| {
        assert!(
            stdout.lines().any(f),
            "no {what} in the quick start's output:\n{stdout}"
        )
    };
    has_line("listening line", &|l| l.starts_with("starkv listening on"));
    has_line("ingest summary", &|l| l.starts_with("arch ready: "));
    has_line("models list from the openai client", &|l| {
        l.contains("'arch'")
    });
    has_line("`ls` header", &|l| {
        l.starts_with("ID ") && l.contains("STATE") && l.ends_with("TTL")
    });
    has_line("`ls` row", &|l| {
        l.starts_with("arch ") && l.contains(" ready ")
    });
    has_line("`show` state", &|l| {
        l.starts_with("state ") && l.ends_with("ready")
    });
    has_line("`pin` summary", &|l| l == "arch pinned");
    has_line("`ttl` summary", &|l| l == "arch: idle TTL 1d");
    has_line("`stats` device", &|l| l.starts_with("device "));
    has_line("`verify` summary", &|l| {
        l == "verified 1 document: every block intact"
    });
    has_line("`evict` summary", &|l| l == "nothing evicted");
    has_line("`gc` summary", &|l| l.starts_with("gc: "));
    has_line("`cluster` of a single server", &|l| {
        l.starts_with("single server on ") && l.ends_with(": no shard workers")
    });
    has_line("`rm` summary", &|l| l.starts_with("deleted arch"));
    assert!(
        !stdout.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
    // On a terminal (`script` gives the command a pseudo-terminal) the report is coloured,
    // unless NO_COLOR is set.
    let on_terminal = |no_color: Option<&str>| {
        let mut command = Command::new("script");
        command
            .args(["-qec", "starkv stats", "/dev/null"])
            .env("PATH", &path)
            .env("STARKV_DATA_DIR", &data_dir)
            .env_remove("STARKV_SERVER")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null());
        if let Some(v) = no_color {
            command.env("NO_COLOR", v);
        }
        let out = command.output().expect("script (util-linux)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(
        coloured.contains("\x1b[32mno checksum failures"),
        "{coloured:?}"
    );
    let plain = on_terminal(Some("1"));
    assert!(
        plain.contains("no checksum failures") && !plain.contains('\x1b'),
        "{plain:?}"
    );
    // The sample `ls` output the README shows has the columns the CLI prints.
    let printed = stdout.lines().find(|l| l.starts_with("ID ")).unwrap();
    let columns = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        readme().lines().any(|l| columns(l) == columns(printed)),
        "README's sample `starkv ls` output lacks the header `{printed}`"
    );
}

/// `docs/figures/NAME.svg` is what `docs/figures/NAME.csv` draws (run `cargo bench
/// --bench figures` after editing a CSV), and the README shows every chart.
#[test]
fn readme_charts_are_drawn_from_their_data_files() {
    let dir = repo().join("docs/figures");
    let readme = readme();
    let mut charts = 0;
    for entry in std::fs::read_dir(&dir).expect("docs/figures") {
        let csv = entry.unwrap().path();
        if csv.extension().is_none_or(|x| x != "csv") {
            continue;
        }
        let chart = plot::Chart::from_csv(&std::fs::read_to_string(&csv).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", csv.display()));
        let drawn = plot::render_svg(&chart).unwrap();
        let svg = csv.with_extension("svg");
        let stored = std::fs::read_to_string(&svg).unwrap_or_default();
        assert!(
            stored == drawn,
            "{} is not what {} draws: run `cargo bench --bench figures`",
            svg.display(),
            csv.display()
        );
        let name = svg.file_name().unwrap().to_string_lossy();
        assert!(
            readme.contains(&format!("(docs/figures/{name})")),
            "README.md does not show docs/figures/{name}"
        );
        charts += 1;
    }
    assert!(charts >= 3, "{charts} charts in docs/figures");
}
