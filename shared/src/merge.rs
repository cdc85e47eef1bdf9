//! Convergence of `shared` rows (written at edges and at head office).
//!
//! Each replica keeps, per shared row, a multi-value register (`crdts::MVReg`) of the row's
//! versions that no other known version has seen: usually one, several after concurrent
//! edits. Every write is a put with the writer's version vector over origins and its hybrid
//! logical clock; replicas exchange those puts (as log entries) and apply them in any order,
//! any number of times. The row terminals and head office see is the register's winner: the
//! version with the greatest `(hlc, encoded values)`, the same on every replica that has seen
//! the same puts. More than one version in the register is a conflict, recorded where head
//! office can see it; the next write anywhere supersedes all of them.

use crdts::{CmRDT, MVReg, VClock, mvreg};
use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::ids::OriginId;
use crate::value::Value;

/// One version of a shared row: its values and the clock of the write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub values: Vec<Value>,
}

impl Version {
    /// The last-writer order: the HLC, then the encoded values (an exact tie of clocks is
    /// broken the same way everywhere).
    fn marker(&self) -> (Hlc, Vec<u8>) {
        (
            self.hlc,
            postcard::to_stdvec(&self.values).expect("postcard encodes values"),
        )
    }
}

/// The replicated state of one shared row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedRow {
    reg: MVReg<Version, OriginId>,
}

impl SharedRow {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encodes registers")
    }

    pub fn decode(bytes: &[u8]) -> Result<SharedRow, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// The versions no other known version has seen (more than one: a conflict).
    pub fn versions(&self) -> Vec<Version> {
        self.reg.read().val
    }

    /// The version terminals and head office see.
    pub fn winner(&self) -> Option<Version> {
        self.versions().into_iter().max_by_key(Version::marker)
    }

    /// Everything this replica has seen of the row.
    pub fn clock(&self) -> VClock<OriginId> {
        self.reg.read_ctx().add_clock
    }

    /// A local write by `origin`: it supersedes every version seen so far. Returns the
    /// write's clock, to travel with its log entry.
    pub fn write(&mut self, origin: &OriginId, hlc: Hlc, values: Vec<Value>) -> VClock<OriginId> {
        let ctx = self.reg.read_ctx().derive_add_ctx(origin.clone());
        let clock = ctx.clock.clone();
        self.reg.apply(self.reg.write(Version { hlc, values }, ctx));
        clock
    }

    /// Applies a write received from another replica. Returns whether the register changed.
    pub fn apply(&mut self, clock: VClock<OriginId>, hlc: Hlc, values: Vec<Value>) -> bool {
        let before = self.clone();
        self.reg.apply(mvreg::Op::Put {
            clock,
            val: Version { hlc, values },
        });
        *self != before
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn o(s: &str) -> OriginId {
        OriginId::parse(s).unwrap()
    }

    fn vals(b: bool) -> Vec<Value> {
        vec![Value::Bool(b)]
    }

    #[test]
    fn causality_beats_the_clock() {
        let mut a = SharedRow::default();
        let c1 = a.write(&o("B001"), Hlc(100), vals(true));
        let mut b = SharedRow::default();
        b.apply(c1, Hlc(100), vals(true));
        // B002 saw B001's write and writes later, with a clock that runs behind.
        let c2 = b.write(&o("B002"), Hlc(50), vals(false));
        assert!(a.apply(c2, Hlc(50), vals(false)));
        assert_eq!(
            a.versions().len(),
            1,
            "no conflict: one write saw the other"
        );
        assert_eq!(a.winner().unwrap().values, vals(false));
        assert_eq!(a, b);
    }

    #[test]
    fn concurrent_writes_conflict_and_resolve_the_same_way_everywhere() {
        let mut x = SharedRow::default();
        let mut y = SharedRow::default();
        let cx = x.write(&o("B001"), Hlc(20), vals(false));
        let cy = y.write(&o("B002"), Hlc(30), vals(true));
        x.apply(cy.clone(), Hlc(30), vals(true));
        y.apply(cx.clone(), Hlc(20), vals(false));
        assert_eq!(x.versions().len(), 2, "the conflict is visible");
        assert_eq!(x.winner(), y.winner());
        assert_eq!(x.winner().unwrap().values, vals(true), "the later HLC wins");
        // Applying again changes nothing.
        assert!(!x.apply(cy, Hlc(30), vals(true)));
        // The next write supersedes both.
        let cz = x.write(&o("B001"), Hlc(40), vals(false));
        y.apply(cz, Hlc(40), vals(false));
        assert_eq!(y.versions().len(), 1);
        assert_eq!(x, y);
    }

    type Put = (VClock<OriginId>, Hlc, Vec<Value>);

    proptest! {
        /// Writes at three replicas (each on top of what it has seen, with deliveries in
        /// between), then every put delivered to fresh replicas in different orders, with
        /// repeats: all end with the same register and winner.
        #[test]
        fn replicas_converge_whatever_the_delivery_order(
            steps in prop::collection::vec((0usize..3, any::<bool>(), any::<prop::sample::Index>()), 1..16),
            orders in prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..40), 3),
        ) {
            let origins = [o("B001"), o("B002"), o("hub")];
            let mut replicas = vec![SharedRow::default(); 3];
            let mut puts: Vec<Put> = Vec::new();
            for (i, (who, val, deliver)) in steps.into_iter().enumerate() {
                // Sometimes a replica first receives an earlier put.
                if !puts.is_empty() {
                    let (c, h, v) = deliver.get(&puts).clone();
                    replicas[who].apply(c, h, v);
                }
                let hlc = Hlc(1000 - (i as u64 % 7) * 10 + i as u64); // clocks disagree
                let values = vec![Value::Bool(val), Value::Int(i as i64)];
                let clock = replicas[who].write(&origins[who], hlc, values.clone());
                puts.push((clock, hlc, values));
            }
            let mut finals = Vec::new();
            for order in orders {
                let mut r = SharedRow::default();
                for ix in &order {
                    let (c, h, v) = ix.get(&puts).clone();
                    r.apply(c, h, v);
                }
                for (c, h, v) in &puts {
                    r.apply(c.clone(), *h, v.clone());
                }
                finals.push((r.winner(), r.clock(), r.versions().len()));
            }
            prop_assert!(finals.windows(2).all(|w| w[0] == w[1]), "{finals:?}");
        }
    }
}
