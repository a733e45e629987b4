//! The `halfmq-broker` binary's command line (having integration tests also
//! makes `cargo test` build the binary, which the black-box tests run).

use std::process::Command;

fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_halfmq-broker"))
}

#[test]
fn print_config_shows_the_documented_defaults() {
    let out = broker().arg("--print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "listen = \"127.0.0.1:8081\"",
        "data_dir = \"./halfmq-data\"",
        "flush = \"sync\"",
        "transaction_timeout_ms = 6000",
        "check_interval_ms = 30000",
        "check_max = 15",
        "max_reconsume_times = 16",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

#[test]
fn flags_override_and_bad_values_exit_2() {
    let out = broker()
        .args([
            "--print-config",
            "--check-interval",
            "2s",
            "--flush",
            "async",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("check_interval_ms = 2000") && text.contains("flush = \"async\""),
        "{text}"
    );
    let out = broker()
        .args(["--retry-delays", "5s 1s", "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("retry_delays"));
    let out = broker()
        .args(["--check-interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses an unparsable duration"
    );
}
