//! Outpost's simulations: the demo (a branch's rush hour on a real edge store). The
//! deterministic protocol simulator and the real-network partition harness live here too as
//! they land.

pub mod catchup;
pub mod demo;
pub mod faultproxy;
pub mod fleet;
pub mod load;
pub mod partition;
pub mod proxy;
pub mod sim;
