//! Where bulk copies run: a tokio runtime of its own, on threads with a lower scheduling
//! priority than the application's.
//!
//! A partition copy moves hundreds of megabytes through QUIC: encryption, packets, system
//! calls. On the runtime that also carries operations, its connection drivers fill the
//! worker queues and every operation waits its turn behind them at each hop (measured with
//! the `rebalance` harness: p99 latency 7–9× its usual value while a million entries move,
//! spread evenly over all partitions — not waits for a lock, but for a worker). Bulk streams
//! therefore travel on a second QUIC endpoint whose tasks run here, on threads of the idle
//! scheduling class by default ([`BulkPriority`]): the kernel runs an operation's worker
//! first whenever it is ready, and the copy gets the CPU that is left.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tracing::{debug, warn};

/// Nice value of bulk threads where the idle scheduling class is refused (the
/// application's keep theirs, normally 0). At 10 the kernel weighs a bulk thread about a
/// tenth of a normal one when both want a core.
pub const BULK_NICE: i32 = 10;

/// How bulk threads (the bulk endpoint's runtime, partition copies) are scheduled: the
/// member's `network.bulk_priority`.
///
/// Measured with the `rebalance` harness (1M entries, 3→4 members, BENCHMARKS.md): under
/// a load that leaves CPU spare, `Idle` keeps the operations' p99 latency during the copy
/// at about 3× its usual value where `Nice` lets it reach about 5×, and the copy moves as
/// fast; under a load that takes every core, `Idle` keeps operations at their usual
/// latency but the copy gets almost nothing (a few % of its unloaded rate) and a rebalance
/// takes that much longer, where `Nice` still gives it about a tenth of a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkPriority {
    /// Linux's `SCHED_IDLE` (the default): the thread runs only on a core that nothing
    /// else wants, and a normal thread that wakes takes the core from it at once. Where
    /// the class is refused, nice 10.
    #[default]
    Idle,
    /// A nice value of [`BULK_NICE`]: about a tenth of a busy core. The kernel lets the
    /// running thread finish its time slice (1–2 ms) before a thread that woke gets the
    /// core, so each hop of an operation may wait that long behind a copy.
    Nice,
    /// The same priority as the application's threads.
    Normal,
}

impl std::str::FromStr for BulkPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Self::Idle),
            "nice" => Ok(Self::Nice),
            "normal" => Ok(Self::Normal),
            other => Err(format!("{other:?} is not idle, nice or normal")),
        }
    }
}

/// Lowers the calling thread's scheduling priority as `priority` says (on Linux; elsewhere
/// the thread keeps its priority). A refusal is logged; the thread then keeps what it has.
pub fn lower_thread_priority(priority: BulkPriority) {
    #[cfg(target_os = "linux")]
    {
        if priority == BulkPriority::Idle {
            match sched_idle::enter() {
                Ok(()) => return,
                Err(e) => {
                    debug!(error = %e, "no idle scheduling class for a bulk thread; nice instead")
                }
            }
        }
        if priority != BulkPriority::Normal {
            if let Err(e) = rustix::process::setpriority_process(None, BULK_NICE) {
                debug!(error = %e, "bulk thread keeps the normal priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

/// The calling thread's scheduling, as [`lower_thread_priority`] leaves it.
pub fn thread_priority() -> BulkPriority {
    #[cfg(target_os = "linux")]
    {
        if sched_idle::is_idle() {
            return BulkPriority::Idle;
        }
        if rustix::process::getpriority_process(None).ok() == Some(BULK_NICE) {
            return BulkPriority::Nice;
        }
    }
    BulkPriority::Normal
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sched_idle {
    use std::io;

    /// Moves the calling thread to `SCHED_IDLE` (allowed without privileges).
    pub(super) fn enter() -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` reads the `sched_param` behind the pointer during the
        // call only, and it points to a live, initialised local. Pid 0 names the calling
        // thread. The call has no effect on this process's memory beyond errno.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether the calling thread is in `SCHED_IDLE`.
    pub(super) fn is_idle() -> bool {
        // SAFETY: takes no pointer; pid 0 names the calling thread; no memory effects.
        unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
    }
}

/// How many threads a pool of bulk work gets: one per core, at most 4.
pub fn bulk_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The shared bulk runtime, started on first use with that caller's `priority` (one
/// runtime per process: members started later in the same process share it as it is);
/// `None` if it could not be started.
pub(crate) fn handle(priority: BulkPriority) -> Option<Handle> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(bulk_threads())
                .thread_name("grid-bulk")
                .on_thread_start(move || lower_thread_priority(priority))
                .enable_all()
                .build()
                .map_err(|e| warn!(error = %e, "no bulk runtime; copies share the application's"))
                .ok()
        })
        .as_ref()
        .map(|rt| rt.handle().clone())
}

/// quinn's tokio runtime, spawning on a given runtime instead of the caller's: a bulk
/// endpoint's connection drivers are started by whoever dials, but must run on the bulk
/// runtime.
pub(crate) struct OnRuntime(pub(crate) Handle);

impl fmt::Debug for OnRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnRuntime")
    }
}

impl Runtime for OnRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(sock)
    }

    /// tokio's clock (quinn's default reads `std::time::Instant`), so that connections
    /// follow a paused or simulated clock like the rest of grid.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bulk_threads_run_at_lower_priority() {
        let handle = handle(BulkPriority::Idle).expect("bulk runtime");
        let (name, priority) = handle
            .spawn(async {
                let name = std::thread::current().name().map(str::to_string);
                (name, thread_priority())
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("grid-bulk"));
        if cfg!(target_os = "linux") {
            assert_ne!(priority, BulkPriority::Normal);
        }
    }
}
