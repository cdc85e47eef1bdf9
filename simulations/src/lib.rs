//! Outpost simulations.
