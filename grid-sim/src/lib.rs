//! Deterministic simulation of a grid cluster (issue 14): the real member code — QUIC and
//! TLS, gossip, the coordinator, the runtime, the caches — for N members on one thread,
//! on a simulated network and a paused, auto-advancing clock, with faults, workloads and
//! checkers chosen by a seed. Same seed, same history: the world keeps a digest of its
//! event log (deliveries, member views, table versions).
//!
//! # Layout
//! - [`net`]: the in-memory datagram network under quinn ([`net::SimNet`],
//!   [`net::SimSocket`]) and its wire faults.
//! - [`world`]: members on the network ([`world::World`]) and [`world::simulate`], the
//!   single-threaded, paused-clock runtime a world runs in.
//! - [`schedule`]: faults as data, generated from a seed (swarm: each seed picks which
//!   kinds are on).
//! - [`workload`]: what every workload shares: [`workload::RunOptions`], the
//!   [`workload::SeedReport`], and the [`workload::Harness`] that starts a world, drives the
//!   seed's faults through it (at most one failure at a time) and ends them; the list of
//!   workloads ([`workload::Workload`]) and [`workload::run`].
//! - [`cache_workload`]: the cache's clients and checkers (`sim --workload cache`); each
//!   service adds a module of the same shape on the harness.
//! - [`copies_workload`]: near and replicated copies converge after the faults (`sim
//!   --workload copies`).
//! - [`exec_workload`]: the bucketed executor's clients, processors and checkers (`sim
//!   --workload exec`).
//! - [`locks_workload`]: the cluster locks' clients and checkers (`sim --workload
//!   locks`): mutual exclusion, growing fencing tokens, no waiter left waiting.
//! - [`sched_workload`]: the cluster scheduler's jobs, runners and checkers (`sim
//!   --workload sched`).
//! - [`scale`]: the figures of a large cluster (100 members) in simulated time.
//! - [`linearizability`]: a Wing & Gong / Lowe checker for single-key histories.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache_workload;
pub mod copies_workload;
pub mod exec_workload;
pub mod linearizability;
pub mod locks_workload;
pub mod net;
pub mod scale;
pub mod sched_workload;
pub mod schedule;
pub mod workload;
pub mod world;
