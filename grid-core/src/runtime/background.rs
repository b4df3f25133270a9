//! Copy work — rebuilding a partition that arrived — on a few threads of lower scheduling
//! priority than the runtime's workers. (A snapshot is encoded under the partition's lock,
//! which writes wait for, so it runs at the application's priority: see
//! `Runtime::take_snapshot`.)
//!
//! A copy is bulk CPU work; the operations it overlaps with are short and latency-bound.
//! On the runtime's workers (or tokio's blocking threads, which the OS treats like them) a
//! copy takes its full share of the cores while operations wait behind it. On threads of the
//! idle scheduling class (or, where that is refused, a higher nice value) the kernel runs an
//! operation's worker first whenever it is ready, and gives the copy whatever CPU is left:
//! a migration goes as fast as the spare CPU allows and operations wait less behind it
//! (BENCHMARKS.md, issue 3, with the bulk endpoint of `grid_net::bulk_runtime`, which does
//! the same for the copy's network work).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Jobs waiting for a copy thread; past it, callers wait.
const QUEUE: usize = 256;

type Job = Box<dyn FnOnce() + Send>;

/// The copy threads of one runtime. The threads end when the last handle is dropped.
pub(crate) struct Background {
    jobs: mpsc::Sender<Job>,
    /// Jobs run on the caller's thread (a deterministic simulation: see
    /// `grid_net::environment::single_threaded`); no thread is started.
    inline: bool,
}

impl Background {
    /// Starts `threads` copy threads (at least one) named after `member`, scheduled as
    /// `priority` says. A thread the OS refuses is logged; with none, every copy fails
    /// with a clear error.
    pub(crate) fn start(
        member: &str,
        threads: usize,
        priority: grid_net::bulk_runtime::BulkPriority,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let inline = grid_net::environment::single_threaded();
        if inline {
            return Self { jobs: tx, inline };
        }
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("grid-copy-{member}-{i}"))
                .spawn(move || {
                    grid_net::bulk_runtime::lower_thread_priority(priority);
                    loop {
                        // One thread waits for the next job at a time; the others wait for
                        // the lock. Jobs are milliseconds long, so this is not contended.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                        match job {
                            Some(job) => job(),
                            None => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                warn!(error = %e, "no copy thread started");
            }
        }
        Self { jobs: tx, inline }
    }

    /// Runs `f` on a copy thread and returns what it returned.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.inline {
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|_| "a copy job failed".to_string());
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // A panic ends the job, not the thread; the caller sees the sender dropped.
            if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(value);
            }
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| "the copy threads have stopped".to_string())?;
        rx.await.map_err(|_| "a copy job failed".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_lower_priority_threads_and_answer() {
        let bg = Background::start("m1", 2, grid_net::bulk_runtime::BulkPriority::Idle);
        let (name, priority) = bg
            .run(|| {
                let name = std::thread::current().name().map(str::to_string);
                (name, grid_net::bulk_runtime::thread_priority())
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("grid-copy-m1-"));
        if cfg!(target_os = "linux") {
            assert_ne!(priority, grid_net::bulk_runtime::BulkPriority::Normal);
        }
        let sums = futures::future::join_all((0..20u64).map(|i| bg.run(move || i * 2))).await;
        let sums: Vec<u64> = sums.into_iter().map(Result::unwrap).collect();
        assert_eq!(sums, (0..20u64).map(|i| i * 2).collect::<Vec<_>>());
        let failed = bg.run(|| -> u32 { panic!("job panics") }).await;
        assert!(failed.is_err());
        // Both threads still answer.
        let after = futures::future::join_all((0..4).map(|i| bg.run(move || i))).await;
        assert_eq!(after, vec![Ok(0), Ok(1), Ok(2), Ok(3)]);
    }
}
