//! The partition harness end to end on every test run: the shipped `ci-smoke` scenario runs
//! real `outpost-hub` and `outpost-edge` processes through UDP fault proxies (lossy links, a
//! cut and heal, an edge kill -9 and restart, a hub kill -9 and restart) under till and
//! screen load, then checks every invariant against the real APIs. The shipped
//! `rolling-update` scenario publishes a new edge release in the middle of the load, with one
//! branch cut off at the time and another restarted mid-download: every edge must end on the
//! new release with every invariant intact.

use simulations::partition::{Scenario, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_smoke_scenario_keeps_every_invariant() {
    let scenario = Scenario::load("ci-smoke").expect("the shipped scenario parses");
    let edge = tests::edge_binary();
    let bin_dir = edge.parent().expect("the binaries' directory");
    // outpost-hub must be beside outpost-edge (cargo builds both for the workspace's tests).
    tests::hub_binary();
    let report = run(&scenario, bin_dir).await.expect("the harness runs");
    println!("{report}");
    assert!(report.ok(), "{report}");
    assert_eq!(report.branches.len(), 2);
    for b in &report.branches {
        assert!(
            b.payments_acknowledged > 0,
            "{} took no payment: {report}",
            b.branch
        );
        assert_eq!(b.edge_last_seq, b.hub_synced_seq, "{report}");
    }
    assert!(
        report.packets_dropped > 0,
        "the cut dropped packets: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_scenario_updates_every_edge_under_load() {
    let scenario = Scenario::load("rolling-update").expect("the shipped scenario parses");
    let edge = tests::edge_binary();
    let bin_dir = edge.parent().expect("the binaries' directory");
    tests::hub_binary();
    let report = run(&scenario, bin_dir).await.expect("the harness runs");
    println!("{report}");
    assert!(report.ok(), "{report}");
    assert_eq!(report.branches.len(), 3);
    for b in &report.branches {
        assert_eq!(b.release, "99.0.0", "{} did not update: {report}", b.branch);
        assert!(
            b.payments_acknowledged > 0,
            "{} took no payment: {report}",
            b.branch
        );
        assert_eq!(b.edge_last_seq, b.hub_synced_seq, "{report}");
    }
}

#[test]
fn every_shipped_scenario_parses_and_bad_ones_are_refused() {
    for (name, _) in simulations::partition::SHIPPED {
        Scenario::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("branches = 0\nname = \"x\"\nduration_s = 5", "branches"),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[link]\ndrop = 2.0",
            "probability",
        ),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[[events]]\nat_s = 1\naction = \"cut\"\nbranch = \"B009\"",
            "no branch",
        ),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[[events]]\nat_s = 9\naction = \"kill_hub\"",
            "outside",
        ),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[[events]]\nat_s = 1\naction = \"explode\"",
            "unknown variant",
        ),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[[events]]\nat_s = 1\naction = \"publish_release\"",
            "needs a version",
        ),
        (
            "branches = 2\nname = \"x\"\nduration_s = 5\n[[events]]\nat_s = 1\naction = \"publish_release\"\nversion = \"2\"",
            "semantic version",
        ),
    ];
    for (i, (text, expected)) in bad.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = Scenario::load(path.to_str().unwrap()).expect_err(text);
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}
