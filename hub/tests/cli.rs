//! The hub's command line: bad arguments and unusable data dirs get one clear line and exit
//! code 2; enroll and revoke work on a fresh data dir. (These tests also make cargo build
//! `outpost-hub` for the end-to-end tests in `tests/`.)

use std::process::Command;

fn hub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
}

#[test]
fn a_bad_branch_id_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = hub()
        .args(["enroll", "--branch", "no spaces please", "--out"])
        .arg(dir.path().join("id"))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    assert!(!dir.path().join("id").exists(), "nothing was issued");
}

#[test]
fn enroll_issues_an_identity_and_revoke_needs_an_enrolled_branch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let id = dir.path().join("id");
    let out = hub()
        .args(["enroll", "--branch", "B001", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&id)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "edge.pem", "edge.key", "release.pub"] {
        assert!(id.join(f).is_file(), "{f} was written");
    }
    let revoke = |branch: &str| {
        hub()
            .args(["revoke", "--branch", branch, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap()
    };
    assert!(revoke("B001").status.success());
    let unknown = revoke("B999");
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not enrolled"));
}

#[test]
fn an_unsupported_storage_url_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = hub()
        .args([
            "serve",
            "--db",
            "postgres://x",
            "--http",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SQLite"));
}
