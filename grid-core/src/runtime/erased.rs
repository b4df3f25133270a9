//! The runtime's side of a service: [`PartitionService`] with its types erased to bytes,
//! so that the runtime holds services of any types in one map and moves their operations,
//! changes and answers over the network without knowing them.

use std::sync::Arc;

use grid_net::codec;

use super::service::{
    CallId, Ctx, Effects, OwnerTask, PartitionService, Rebuilt, Reply, ServiceHandle, Snapshot,
    TimerCommand,
};
use super::Runtime;

/// What `prepare` decided, encoded.
pub(crate) struct ErasedPrepared {
    /// The caller's answer (an encoded `Result<Answer, Error>`); `None` parks the call.
    pub(crate) reply: Option<Vec<u8>>,
    /// The encoded change.
    pub(crate) change: Option<Vec<u8>>,
}

/// [`Effects`], encoded.
#[derive(Default)]
pub(crate) struct ErasedEffects {
    /// (call, encoded `Result<Answer, Error>`).
    pub(crate) wakes: Vec<(CallId, Vec<u8>)>,
    pub(crate) messages: Vec<(Arc<str>, Vec<u8>)>,
    pub(crate) timers: Vec<TimerCommand>,
    /// Encoded operations.
    pub(crate) submits: Vec<Vec<u8>>,
}

impl ErasedEffects {
    pub(crate) fn is_empty(&self) -> bool {
        self.wakes.is_empty()
            && self.messages.is_empty()
            && self.timers.is_empty()
            && self.submits.is_empty()
    }
}

/// A service as the runtime calls it. `Err(String)` is the runtime's own trouble (bytes
/// that do not decode: a peer's input, or a bug), never the service's refusal, which
/// travels encoded in the answer.
pub(crate) trait ErasedService: Send + Sync {
    fn name(&self) -> &str;
    fn read(&self, ctx: &Ctx, op: &[u8]) -> Result<Vec<u8>, String>;
    fn prepare(&self, ctx: &Ctx, op: &[u8]) -> Result<ErasedPrepared, String>;
    fn apply(&self, ctx: &Ctx, change: &[u8]) -> Result<ErasedEffects, String>;
    fn on_owned(&self, ctx: &Ctx) -> ErasedEffects;
    fn on_disowned(&self, partition: u32);
    fn on_member_left(&self, ctx: &Ctx, member: &str) -> ErasedEffects;
    fn on_timer(&self, ctx: &Ctx, timer: u64) -> ErasedEffects;
    fn on_abandoned(&self, ctx: &Ctx, call: CallId) -> ErasedEffects;
    fn on_message(&self, from: &str, message: &[u8]) -> Result<(), String>;
    fn on_ask(&self, from: &str, message: &[u8]) -> Result<Vec<u8>, String>;
    fn owner_task(&self, partition: u32, runtime: &Runtime) -> Option<OwnerTask>;
    fn snapshot(&self, partition: u32, chunk_bytes: usize) -> Snapshot;
    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, String>;
    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), String>;
    fn drop_partition(&self, partition: u32);
    fn partition_len(&self, partition: u32) -> usize;
}

/// A typed service behind [`ErasedService`].
pub(crate) struct Typed<S>(pub(crate) Arc<S>);

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    codec::encode(value).map_err(|e| e.to_string())
}

/// An answer as it travels: `Result<Answer, Error>`, encoded.
fn encode_answer<S: PartitionService>(
    answer: &Result<S::Answer, S::Error>,
) -> Result<Vec<u8>, String> {
    encode(answer)
}

fn erase<S: PartitionService>(fx: Effects<S>) -> ErasedEffects {
    let mut out = ErasedEffects {
        timers: fx.timers,
        ..Default::default()
    };
    for (call, answer) in fx.wakes {
        match encode_answer::<S>(&answer) {
            Ok(a) => out.wakes.push((call, a)),
            Err(e) => tracing::warn!(?call, error = %e, "answer of a woken call does not encode"),
        }
    }
    for (member, message) in fx.messages {
        match encode(&message) {
            Ok(m) => out.messages.push((member, m)),
            Err(e) => tracing::warn!(%member, error = %e, "service message does not encode"),
        }
    }
    for op in fx.submits {
        match encode(&op) {
            Ok(o) => out.submits.push(o),
            Err(e) => tracing::warn!(error = %e, "submitted operation does not encode"),
        }
    }
    out
}

impl<S: PartitionService> ErasedService for Typed<S> {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn read(&self, ctx: &Ctx, op: &[u8]) -> Result<Vec<u8>, String> {
        let op: S::Op = codec::decode(op).map_err(|e| e.to_string())?;
        encode_answer::<S>(&self.0.read(ctx, &op))
    }

    fn prepare(&self, ctx: &Ctx, op: &[u8]) -> Result<ErasedPrepared, String> {
        let op: S::Op = codec::decode(op).map_err(|e| e.to_string())?;
        match self.0.prepare(ctx, op) {
            Ok(prepared) => Ok(ErasedPrepared {
                reply: match prepared.reply {
                    Reply::Now(a) => Some(encode_answer::<S>(&Ok(a))?),
                    Reply::Park => None,
                },
                change: prepared.change.as_ref().map(encode).transpose()?,
            }),
            Err(e) => Ok(ErasedPrepared {
                reply: Some(encode_answer::<S>(&Err(e))?),
                change: None,
            }),
        }
    }

    fn apply(&self, ctx: &Ctx, change: &[u8]) -> Result<ErasedEffects, String> {
        let change: S::Change = codec::decode(change).map_err(|e| e.to_string())?;
        let mut fx = Effects::default();
        self.0
            .apply(ctx, &change, &mut fx)
            .map_err(|e| e.to_string())?;
        Ok(erase(fx))
    }

    fn on_owned(&self, ctx: &Ctx) -> ErasedEffects {
        let mut fx = Effects::default();
        self.0.on_owned(ctx, &mut fx);
        erase(fx)
    }

    fn on_disowned(&self, partition: u32) {
        self.0.on_disowned(partition)
    }

    fn on_member_left(&self, ctx: &Ctx, member: &str) -> ErasedEffects {
        let mut fx = Effects::default();
        self.0.on_member_left(ctx, member, &mut fx);
        erase(fx)
    }

    fn on_timer(&self, ctx: &Ctx, timer: u64) -> ErasedEffects {
        let mut fx = Effects::default();
        self.0.on_timer(ctx, timer, &mut fx);
        erase(fx)
    }

    fn on_abandoned(&self, ctx: &Ctx, call: CallId) -> ErasedEffects {
        let mut fx = Effects::default();
        self.0.on_abandoned(ctx, call, &mut fx);
        erase(fx)
    }

    fn on_message(&self, from: &str, message: &[u8]) -> Result<(), String> {
        let message: S::Message = codec::decode(message).map_err(|e| e.to_string())?;
        self.0.on_message(from, message);
        Ok(())
    }

    fn on_ask(&self, from: &str, message: &[u8]) -> Result<Vec<u8>, String> {
        let message: S::Message = codec::decode(message).map_err(|e| e.to_string())?;
        let answer = self
            .0
            .on_ask(from, message)
            .ok_or_else(|| format!("service {:?} has no answer to that", self.0.name()))?;
        encode(&answer)
    }

    fn owner_task(&self, partition: u32, runtime: &Runtime) -> Option<OwnerTask> {
        self.0.owner_task(
            partition,
            ServiceHandle::new(runtime.clone(), self.0.clone()),
        )
    }

    fn snapshot(&self, partition: u32, chunk_bytes: usize) -> Snapshot {
        self.0.snapshot(partition, chunk_bytes)
    }

    fn rebuild(&self, partition: u32, chunks: Vec<bytes::Bytes>) -> Result<Rebuilt, String> {
        self.0.rebuild(partition, chunks).map_err(|e| e.to_string())
    }

    fn install(&self, partition: u32, rebuilt: Rebuilt) -> Result<(), String> {
        self.0
            .install(partition, rebuilt)
            .map_err(|e| e.to_string())
    }

    fn drop_partition(&self, partition: u32) {
        self.0.drop_partition(partition)
    }

    fn partition_len(&self, partition: u32) -> usize {
        self.0.partition_len(partition)
    }
}
