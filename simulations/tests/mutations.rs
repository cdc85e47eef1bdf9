//! Proof that the simulator bites (run with `--features mutations`): each deliberate protocol
//! bug is caught by seeds of a fixed set.
#![cfg(feature = "mutations")]

use simulations::sim::mutants;

#[test]
fn every_deliberate_bug_is_caught() {
    std::panic::set_hook(Box::new(|_| {}));
    for (m, caught, total) in mutants(0..100) {
        assert!(caught > 0, "{m:?} was caught by none of {total} seeds");
    }
}
