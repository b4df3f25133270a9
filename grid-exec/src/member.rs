//! The member executor: a named async task, registered on the members that can run it
//! ([`MemberExecutor::register_task`]), run with serde arguments on one member, on every
//! member (each answer collected, each member that did not answer reported), or on the
//! owner of a key's partition, next to the data (Confluence's `ClusterExecutionService`,
//! Hazelcast's `IExecutorService`).
//!
//! ```
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let grid = grid::Grid::builder().cluster_name("member-exec-doc").bind("127.0.0.1:0").no_seeds().start().await?;
//! let exec = grid.executor();
//! exec.register_task("add", |(a, b): (u32, u32)| async move { Ok::<u32, String>(a + b) });
//!
//! let me = grid.cluster().local_member().id.to_string();
//! let sum: u32 = exec.run_on(&me, "add", &(2u32, 3u32), Duration::from_secs(5)).await?;
//! assert_eq!(sum, 5);
//! for (member, answer) in exec.run_on_all::<_, u32>("add", &(1u32, 1u32), Duration::from_secs(5)).await {
//!     println!("{member}: {answer:?}");
//! }
//! let on_owner: u32 = exec.run_on_key_owner(&"user-42", "add", &(4u32, 4u32), Duration::from_secs(5)).await?;
//! assert_eq!(on_owner, 8);
//! # grid.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Semantics
//! - A task runs at most once per call: there is no retry (a retry is the caller's
//!   decision, since the task may have run).
//! - **Timeouts and cancellation**: a call ends at its timeout; a call that ends early
//!   (timeout, or the caller drops its future) cancels the task where it runs — its future
//!   is dropped at its next await point, remotely too (the transport drops the handler of
//!   a request whose caller gave up). Work that must finish once begun goes into a
//!   `tokio::spawn` of the task's own.
//! - A panicking task is reported as [`TaskError::Panicked`]; the member goes on.
//! - The arguments and answer are MessagePack-encoded, at most the transport's frame size.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use grid_core::runtime::Runtime;
use grid_net::membership::Cluster;
use grid_net::transport::Transport;
use grid_net::NetError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The route of task requests.
const ROUTE: &str = "exec.member.run";
/// Longest task name, in bytes.
pub const MAX_TASK_NAME: usize = 255;

/// Why running a task failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TaskError {
    /// The member has no task of that name registered.
    #[error("no task {task:?} registered on {member}")]
    NoSuchTask {
        /// The task.
        task: String,
        /// The member.
        member: String,
    },
    /// The task returned an error (its text).
    #[error("task failed: {0}")]
    Failed(String),
    /// The task panicked.
    #[error("task panicked")]
    Panicked,
    /// The member is not a live member of the cluster (it left, failed, or never was).
    #[error("{0} is not a live member")]
    NotAMember(String),
    /// The member could not be reached, or the connection was lost mid-call (the task
    /// may have run, or be running).
    #[error("{member} unreachable: {reason}")]
    Unreachable {
        /// The member.
        member: String,
        /// Why.
        reason: String,
    },
    /// No answer within the timeout; the task was cancelled where it ran (it may have run
    /// part way).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Arguments or answer did not encode or decode.
    #[error("codec: {0}")]
    Codec(String),
    /// The key's partition has no owner (none within 10 s).
    #[error("no owner for the key's partition")]
    NoOwner,
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    task: String,
    #[serde(with = "grid_core::codec::bin")]
    args: Vec<u8>,
}

/// What a member answers: the task's encoded answer, or why not.
type Reply = Result<Vec<u8>, TaskError>;

type ErasedTask = Arc<dyn Fn(Vec<u8>) -> BoxFuture<'static, Reply> + Send + Sync>;

/// A member's executor of named tasks. Cheap to clone. `grid::Grid` starts one on every
/// member ([`grid::Grid::executor`](../../grid/struct.Grid.html#method.executor)).
#[derive(Clone)]
pub struct MemberExecutor {
    tasks: Arc<RwLock<HashMap<String, ErasedTask>>>,
    transport: Transport,
    cluster: Cluster,
    runtime: Runtime,
}

impl std::fmt::Debug for MemberExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberExecutor").finish_non_exhaustive()
    }
}

impl MemberExecutor {
    /// Serves task requests on `transport`.
    pub fn start(transport: Transport, cluster: Cluster, runtime: Runtime) -> Self {
        let tasks: Arc<RwLock<HashMap<String, ErasedTask>>> = Arc::default();
        let me = cluster.local_member().id.to_string();
        let served = tasks.clone();
        transport.on_request_typed(ROUTE, move |_peer, req: Request| {
            let task = served
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&req.task)
                .cloned();
            let me = me.clone();
            async move {
                // The task runs in this future: dropped (cancelled) when the caller gives up.
                let reply: Reply = match task {
                    Some(task) => task(req.args).await,
                    None => Err(TaskError::NoSuchTask {
                        task: req.task,
                        member: me,
                    }),
                };
                Ok::<Reply, String>(reply)
            }
        });
        Self {
            tasks,
            transport,
            cluster,
            runtime,
        }
    }

    /// Registers (or replaces) the task `name` on this member: `f` gets the decoded
    /// arguments; its `Ok` is encoded back to the caller, its `Err` reaches the caller as
    /// [`TaskError::Failed`].
    ///
    /// # Panics
    /// If `name` is longer than [`MAX_TASK_NAME`] bytes (a programming error).
    pub fn register_task<A, R, E, F, Fut>(&self, name: &str, f: F)
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        E: std::fmt::Display + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
    {
        assert!(
            name.len() <= MAX_TASK_NAME,
            "task name longer than 255 bytes"
        );
        let f = Arc::new(f);
        let task: ErasedTask = Arc::new(move |args: Vec<u8>| {
            let f = f.clone();
            Box::pin(async move {
                let args: A = grid_core::codec::decode(&args)
                    .map_err(|e| TaskError::Codec(format!("arguments: {e}")))?;
                let run = AssertUnwindSafe(async move { f(args).await }).catch_unwind();
                match run.await {
                    Ok(Ok(answer)) => grid_core::codec::encode(&answer)
                        .map_err(|e| TaskError::Codec(format!("answer: {e}"))),
                    Ok(Err(e)) => Err(TaskError::Failed(e.to_string())),
                    Err(_) => Err(TaskError::Panicked),
                }
            })
        });
        self.tasks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), task);
    }

    /// Forgets the task `name` on this member.
    pub fn unregister_task(&self, name: &str) {
        self.tasks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Runs `task` with `args` on `member` (this one included) and returns its answer,
    /// within `timeout`.
    pub async fn run_on<A, R>(
        &self,
        member: &str,
        task: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, TaskError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let args = grid_core::codec::encode(args).map_err(|e| TaskError::Codec(e.to_string()))?;
        let answer = self.run_encoded(member, task, args, timeout).await?;
        grid_core::codec::decode(&answer).map_err(|e| TaskError::Codec(format!("answer: {e}")))
    }

    /// Runs `task` on every live member at once; returns each member's result, in member
    /// order. A member that does not answer (dead, unreachable, too slow) is in the list
    /// with its error, not left out.
    pub async fn run_on_all<A, R>(
        &self,
        task: &str,
        args: &A,
        timeout: Duration,
    ) -> Vec<(String, Result<R, TaskError>)>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let members: Vec<String> = self
            .cluster
            .members()
            .iter()
            .map(|m| m.id.to_string())
            .collect();
        self.run_on_members(&members, task, args, timeout).await
    }

    /// Runs `task` on each of `members` at once (a member that is not live is reported as
    /// [`TaskError::NotAMember`]).
    pub async fn run_on_members<A, R>(
        &self,
        members: &[String],
        task: &str,
        args: &A,
        timeout: Duration,
    ) -> Vec<(String, Result<R, TaskError>)>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let args = match grid_core::codec::encode(args) {
            Ok(a) => a,
            Err(e) => {
                return members
                    .iter()
                    .map(|m| (m.clone(), Err(TaskError::Codec(e.to_string()))))
                    .collect()
            }
        };
        let calls = members.iter().map(|m| {
            let args = args.clone();
            async move {
                let answer = self
                    .run_encoded(m, task, args, timeout)
                    .await
                    .and_then(|a| {
                        grid_core::codec::decode(&a)
                            .map_err(|e| TaskError::Codec(format!("answer: {e}")))
                    });
                (m.clone(), answer)
            }
        });
        futures::future::join_all(calls).await
    }

    /// Runs `task` on the member that owns `key`'s partition (as a cache or lock with that
    /// key would be placed), next to its data.
    pub async fn run_on_key_owner<K, A, R>(
        &self,
        key: &K,
        task: &str,
        args: &A,
        timeout: Duration,
    ) -> Result<R, TaskError>
    where
        K: Serialize + ?Sized,
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let key = grid_core::codec::encode(key).map_err(|e| TaskError::Codec(e.to_string()))?;
        let p = self.runtime.partition_of(&key);
        // A member that just started may not have the table yet (at most 10 s).
        self.runtime.wait_for_owner(p).await;
        let owner = self
            .runtime
            .table()
            .owner(p)
            .map(|o| o.to_string())
            .ok_or(TaskError::NoOwner)?;
        self.run_on(&owner, task, args, timeout).await
    }

    async fn run_encoded(
        &self,
        member: &str,
        task: &str,
        args: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TaskError> {
        metrics::counter!("grid_exec_member_tasks_total").increment(1);
        if *member == *self.cluster.local_member().id {
            let found = self
                .tasks
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(task)
                .cloned();
            let Some(found) = found else {
                return Err(TaskError::NoSuchTask {
                    task: task.to_string(),
                    member: member.to_string(),
                });
            };
            return tokio::time::timeout(timeout, found(args))
                .await
                .unwrap_or(Err(TaskError::Timeout(timeout)));
        }
        let Some(to) = self.cluster.member(member) else {
            return Err(TaskError::NotAMember(member.to_string()));
        };
        let req = Request {
            task: task.to_string(),
            args,
        };
        let answer: Result<Reply, NetError> = self
            .transport
            .request_typed(to.addr, ROUTE, &req, timeout)
            .await;
        match answer {
            Ok(reply) => reply,
            Err(NetError::Timeout { .. }) => Err(TaskError::Timeout(timeout)),
            Err(e) => Err(TaskError::Unreachable {
                member: member.to_string(),
                reason: e.to_string(),
            }),
        }
    }
}
