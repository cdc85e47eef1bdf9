//! The simulator on a fixed set of seeds: every seed keeps the invariants and converges, a
//! seed replays to the same trace, and every kind of fault fires somewhere in the set.

use simulations::sim::{FaultCounts, SimConfig, run_seed};

#[test]
fn a_fixed_set_of_seeds_keeps_the_invariants_and_converges() {
    let mut faults = FaultCounts::default();
    for seed in 0..150 {
        let outcome = run_seed(SimConfig::new(seed));
        assert!(outcome.failure.is_none(), "{outcome}");
        assert!(outcome.entries > 0, "seed {seed} wrote nothing");
        faults.add(&outcome.faults);
    }
    assert!(
        faults.missing().is_empty(),
        "faults that never fired: {:?}",
        faults.missing()
    );
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 4242, 99_999] {
        let a = run_seed(SimConfig::new(seed));
        let b = run_seed(SimConfig::new(seed));
        assert_eq!(a.digest, b.digest, "seed {seed}");
        assert_eq!(a.faults, b.faults);
        assert_eq!(a.steps, b.steps);
    }
    assert_ne!(
        run_seed(SimConfig::new(1)).digest,
        run_seed(SimConfig::new(2)).digest
    );
}

#[test]
fn sixteen_edges_converge() {
    let mut config = SimConfig::new(31337);
    config.edges = 16;
    let outcome = run_seed(config);
    assert!(outcome.failure.is_none(), "{outcome}");
}
