//! Prometheus text exposition, built by hand: a few families, no dependency needed. (Building
//! text is not I/O; the HTTP layers serve it.)

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// A Prometheus text exposition being built.
#[derive(Default)]
pub struct Exposition(pub String);

impl Exposition {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "counter", help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "gauge", help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        bounds: &[u64],
        counts: &[AtomicU64],
        sum: Option<u64>,
    ) {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (b, c) in bounds.iter().zip(counts) {
            cumulative += c.load(Relaxed);
            let le = if *b == u64::MAX {
                "+Inf".to_owned()
            } else {
                b.to_string()
            };
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        if let Some(sum) = sum {
            let _ = writeln!(self.0, "{name}_sum {sum}");
        }
        let _ = writeln!(self.0, "{name}_count {cumulative}");
    }
}
