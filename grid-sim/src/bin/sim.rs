//! `sim`: runs many seeds of a workload in the deterministic simulator.
fn main() {}
