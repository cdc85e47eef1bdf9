//! Hybrid logical clock stamps: wall-clock milliseconds with a logical counter, so stamps
//! respect causality even when clocks are skewed. The caller passes physical time in.

use serde::{Deserialize, Serialize};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;

/// A stamp: `(wall_ms << 16) | logical`. Totally ordered; ties between origins are broken by
/// the origin id wherever a total order across replicas is needed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(wall_ms: u64, logical: u16) -> Hlc {
        Hlc((wall_ms << LOGICAL_BITS) | u64::from(logical))
    }
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MAX) as u16
    }
}

/// A replica's clock. `last` is persisted by the caller when it wants stamps to stay monotonic
/// across restarts (the edge stores the last stamp it wrote into its log).
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    pub fn starting_after(last: Hlc) -> HlcClock {
        HlcClock { last }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A stamp for a local event at physical time `now_ms`, greater than every stamp issued or
    /// observed before.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.wall_ms() {
            Hlc::new(now_ms, 0)
        } else {
            Hlc(self.last.0 + 1) // a full counter carries into the wall part: still monotonic
        };
        self.last
    }

    /// Merges a stamp received from another replica; the next tick is greater than it.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Hlc {
        let floor = Hlc::new(now_ms, 0);
        self.last = self.last.max(remote).max(floor);
        self.tick(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_under_skew() {
        let mut c = HlcClock::default();
        let a = c.tick(1000);
        let b = c.tick(999); // the wall clock stepped back
        assert!(b > a);
        let remote = Hlc::new(5000, 7);
        let d = c.observe(remote, 1001);
        assert!(d > remote);
        assert!(c.tick(1002) > d);
        let mut full = HlcClock::starting_after(Hlc::new(10, u16::MAX));
        let e = full.tick(10);
        assert_eq!(e.wall_ms(), 11);
    }
}
