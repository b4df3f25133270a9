//! Length-prefixed frames on QUIC streams: a `u32` big-endian length, then that many bytes.
//!
//! The length is checked against the limit before anything is buffered, and the body's
//! buffer is allocated only once its first bytes arrive, so a peer that announces a large
//! frame and sends nothing costs nothing. The body is copied once into a buffer of its full
//! size, up to 4 MiB (growing one by doubling from 64 KiB copied a 1 MiB migration chunk
//! several times over fresh pages). It is always copied: a piece quinn hands out shares the
//! allocation of a whole receive batch, which a small frame kept in a queue would otherwise
//! hold on to.

use bytes::{Bytes, BytesMut};
use quinn::RecvStream;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated { got: usize, expected: usize },
    #[error("stream failed: {0}")]
    Stream(String),
}

impl FrameError {
    /// A short label for metrics and logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Truncated { .. } => "truncated",
            Self::Stream(_) => "stream",
        }
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream at a frame boundary.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<Option<Bytes>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(FrameError::Truncated { got, expected: 4 })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Stream(e.to_string())),
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let mut body = BytesMut::new();
    while body.len() < size {
        match recv.read_chunk(size - body.len(), true).await {
            Ok(Some(chunk)) => {
                if body.capacity() == 0 {
                    // Up to 4 MiB at once (a migration chunk is 1 MiB); a larger frame
                    // grows as it arrives, so what is allocated follows what was sent.
                    body.reserve(size.min(4 << 20));
                }
                body.extend_from_slice(&chunk.bytes)
            }
            Ok(None) => {
                return Err(FrameError::Truncated {
                    got: body.len(),
                    expected: size,
                })
            }
            Err(e) => return Err(FrameError::Stream(e.to_string())),
        }
    }
    Ok(Some(body.freeze()))
}

/// Reads the frames of a stream that carries many small ones (a lane): takes whatever quinn
/// has received at once and cuts the frames out of it, so that a small frame costs no call
/// into quinn (and no lock of the connection) of its own. Each frame is still copied into a
/// buffer of its own, for the reason the module explains. Same checks as [`read_frame`].
#[derive(Default)]
pub(crate) struct FrameReader {
    /// Received bytes not handed out yet: the start of the next frame. It shares quinn's
    /// receive buffer only until that frame is read.
    held: Bytes,
}

impl FrameReader {
    /// The next frame; `Ok(None)` at a clean end of stream at a frame boundary.
    pub(crate) async fn next(
        &mut self,
        recv: &mut RecvStream,
        limit: usize,
    ) -> Result<Option<Bytes>, FrameError> {
        while self.held.len() < 4 {
            match recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.hold(chunk.bytes),
                Ok(None) if self.held.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(FrameError::Truncated {
                        got: self.held.len(),
                        expected: 4,
                    })
                }
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&self.held[..4]);
        let size = u32::from_be_bytes(len) as usize;
        if size > limit {
            return Err(FrameError::TooLarge { size, limit });
        }
        if self.held.len() >= 4 + size {
            let frame = Bytes::copy_from_slice(&self.held[4..4 + size]);
            self.held = self.held.slice(4 + size..);
            return Ok(Some(frame));
        }
        // The rest of the frame is still on its way: gather it in a buffer of its full size
        // (up to 4 MiB, as `read_frame` does), reading no further than its end.
        let mut body = BytesMut::with_capacity(size.min(4 << 20));
        body.extend_from_slice(&self.held[4..]);
        self.held = Bytes::new();
        while body.len() < size {
            match recv.read_chunk(size - body.len(), true).await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(FrameError::Truncated {
                        got: body.len(),
                        expected: size,
                    })
                }
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
        Ok(Some(body.freeze()))
    }

    fn hold(&mut self, more: Bytes) {
        if self.held.is_empty() {
            self.held = more;
        } else {
            let mut joined = BytesMut::with_capacity(self.held.len() + more.len());
            joined.extend_from_slice(&self.held);
            joined.extend_from_slice(&more);
            self.held = joined.freeze();
        }
    }
}
