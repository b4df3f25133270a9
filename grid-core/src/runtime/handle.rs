//! A registered service's typed door to the runtime: run its operations on their owners,
//! send its messages.

use std::sync::Arc;

use grid_net::codec;

use super::messages::{routes, ServiceMessage};
use super::service::PartitionService;
use super::{OpKind, Runtime};
use crate::GridError;

/// What [`Runtime::register_service`] returns: runs the service's operations and sends its
/// messages. Cheap to clone.
pub struct ServiceHandle<S: PartitionService> {
    runtime: Runtime,
    service: Arc<S>,
}

impl<S: PartitionService> Clone for ServiceHandle<S> {
    fn clone(&self) -> Self {
        Self {
            runtime: self.runtime.clone(),
            service: self.service.clone(),
        }
    }
}

impl<S: PartitionService> std::fmt::Debug for ServiceHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHandle")
            .field("service", &self.service.name())
            .finish()
    }
}

impl<S: PartitionService> ServiceHandle<S> {
    pub(crate) fn new(runtime: Runtime, service: Arc<S>) -> Self {
        Self { runtime, service }
    }

    /// The service on this member.
    pub fn service(&self) -> &Arc<S> {
        &self.service
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Runs `op` on `partition`'s owner (retrying as `kind` allows, within the runtime's
    /// operation timeout). The outer error is the runtime's (no owner in time, outcome
    /// unknown, ...); the inner one is the service's own refusal.
    pub async fn execute(
        &self,
        partition: u32,
        op: S::Op,
        kind: OpKind,
    ) -> Result<Result<S::Answer, S::Error>, GridError> {
        let op = codec::encode(&op)?;
        let answer = self
            .runtime
            .execute(self.service.name(), partition, op, kind)
            .await?;
        Ok(codec::decode(&answer)?)
    }

    /// Asks this service on `member` (this one included) and returns its answer
    /// ([`PartitionService::on_ask`]), within `timeout`.
    pub async fn ask(
        &self,
        member: &str,
        message: &S::Message,
        timeout: std::time::Duration,
    ) -> Result<S::Message, GridError> {
        let inner = &self.runtime.inner;
        if *member == *inner.me {
            let local = codec::decode(&codec::encode(message)?)?;
            return self
                .service
                .on_ask(member, local)
                .ok_or_else(|| GridError::Service("no answer".into()));
        }
        let to = inner
            .cluster
            .member(member)
            .ok_or_else(|| GridError::Service(format!("{member} is not a live member")))?;
        let ask = ServiceMessage {
            service: self.service.name().to_string(),
            body: codec::encode(message)?,
        };
        let answer: ServiceMessage = inner
            .transport
            .request_typed(to.addr, routes::SERVICE_ASK, &ask, timeout)
            .await?;
        Ok(codec::decode(&answer.body)?)
    }

    /// Sends `message` to this service on `member`: one-way, in order per member, at most
    /// once (dropped if the member is unreachable).
    pub async fn send(&self, member: &str, message: &S::Message) -> Result<(), GridError> {
        send_encoded(
            &self.runtime,
            self.service.name(),
            member,
            codec::encode(message)?,
        )
        .await
    }
}

/// Sends an encoded service message (see [`ServiceHandle::send`]).
pub(crate) async fn send_encoded(
    runtime: &Runtime,
    service: &str,
    member: &str,
    message: Vec<u8>,
) -> Result<(), GridError> {
    if *member == *runtime.inner.me {
        // To this member: no connection to itself (the transport refuses one).
        let slot = runtime
            .slot(service)
            .ok_or_else(|| GridError::Service(format!("no service {service:?}")))?;
        return slot
            .service
            .on_message(member, &message)
            .map_err(GridError::Service);
    }
    let to = runtime
        .inner
        .cluster
        .member(member)
        .ok_or_else(|| GridError::Service(format!("{member} is not a live member")))?;
    let body = codec::encode(&ServiceMessage {
        service: service.to_string(),
        body: message,
    })?;
    runtime
        .inner
        .transport
        .send_ordered(to.addr, routes::SERVICE_MESSAGE, &body)
        .await?;
    Ok(())
}
