//! The `halfmq` CLI's own behaviour (having integration tests also makes
//! `cargo test` build the binary, which the black-box tests run).

use std::process::Command;

fn halfmq() -> Command {
    Command::new(env!("CARGO_BIN_EXE_halfmq"))
}

#[test]
fn help_lists_every_command() {
    let out = halfmq().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["topic", "send", "consume", "tx", "dlq", "stats"] {
        assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
    }
}

#[test]
fn an_unreachable_broker_is_a_clear_failure() {
    // Port 1 on loopback: nothing listens there.
    let out = halfmq()
        .args(["--broker", "127.0.0.1:1", "send", "t", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("halfmq:"));
}
