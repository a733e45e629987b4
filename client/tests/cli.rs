//! The `halfmq` CLI's own behaviour, without a broker (having integration
//! tests also makes `cargo test` build the binary, which the black-box tests
//! run).

use std::process::Command;

fn halfmq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_halfmq"))
}

#[test]
fn help_lists_every_command() {
    let out = halfmq().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in [
        "topic",
        "send",
        "consume",
        "tx",
        "group",
        "dlq",
        "stats",
        "completions",
    ] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
}

#[test]
fn an_unreachable_broker_is_one_clear_line() {
    // Port 1 on loopback: nothing listens there.
    let out = halfmq()
        .args(["--broker", "127.0.0.1:1", "send", "t", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "halfmq: cannot connect to 127.0.0.1:1: connection refused (is the broker running?)\n"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_broker_address_without_a_port_is_refused() {
    for addr in ["127.0.0.1", "localhost", "http://127.0.0.1"] {
        let out = halfmq()
            .args(["--broker", addr, "topic", "list"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("has no port"), "{addr}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef halfmq"),
        ("fish", "complete -c halfmq"),
    ] {
        let out = halfmq().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("reset-offset"),
            "{shell} knows the subcommands"
        );
    }
    let out = halfmq().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown shell");
}
