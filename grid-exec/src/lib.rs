//! grid's executors and scheduler, each a service on the runtime's partitions:
//!
//! - [`bucketed`]: the bucketed executor (issue 16): tasks submitted anywhere, queued in the
//!   partition of their bucket, processed in order per bucket by one member at a time.
//! - [`member`]: the member executor (issue 16): a registered task run on one member, on
//!   all members, or on the owner of a key.
//! - [`scheduler`]: the cluster scheduler (issue 17): jobs that fire once per cluster (or
//!   locally), never lost and never doubled.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bucketed;
pub mod member;
pub mod scheduler;
