//! The command line fits the shell: completions and man pages generated from the clap
//! definitions, and `--help` examples for the commands people use first.

use std::process::{Command, Output};

fn starkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_starkv"))
        .args(args)
        .output()
        .expect("starting starkv")
}

fn stdout_of(args: &[&str]) -> String {
    let out = starkv(args);
    assert!(
        out.status.success(),
        "starkv {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn completions_name_every_command_and_load_in_bash() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(&["completions", shell]);
        for word in [
            "serve",
            "ingest",
            "ask",
            "evict",
            "verify",
            "completions",
            "server",
        ] {
            assert!(script.contains(word), "{shell} completions lack `{word}`");
        }
    }
    let file = std::env::temp_dir().join(format!("starkv-completion-{}.bash", std::process::id()));
    std::fs::write(&file, stdout_of(&["completions", "bash"])).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source '{}' && complete -p starkv", file.display()))
        .output()
        .expect("bash");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("starkv"),
        "bash did not register the completion: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = starkv(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_cover_the_commands() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH starkv 1"), "{page}");
    for word in ["ingest", "serve", "Exit codes", "STARKV_SERVER"] {
        assert!(page.contains(word), "the man page lacks `{word}`");
    }
    let dir = std::env::temp_dir().join(format!("starkv-man-{}", std::process::id()));
    let _ = stdout_of(&["man", "--out-dir", dir.to_str().unwrap()]);
    for name in [
        "starkv.1",
        "starkv-serve.1",
        "starkv-ingest.1",
        "starkv-ask.1",
    ] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(text.contains(".TH"), "{name} was not written as a man page");
    }
    let hidden = dir.join("starkv-dump-kv.1");
    assert!(!hidden.exists(), "hidden commands get no page");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_shows_examples_for_serve_ingest_and_ask() {
    for command in ["serve", "ingest", "ask"] {
        let help = stdout_of(&[command, "--help"]);
        assert!(
            help.contains("Examples:") && help.contains(&format!("starkv {command} ")),
            "`starkv {command} --help` has no examples:\n{help}"
        );
    }
}
