//! Length-prefixed frames on QUIC streams: a `u32` big-endian length, then that many bytes.
//!
//! The length is checked against the limit before anything is buffered, and the body's
//! buffer is allocated only once its first bytes arrive, so a peer that announces a large
//! frame and sends nothing costs nothing. The body is copied once into a buffer of its full
//! size, up to 4 MiB (growing one by doubling from 64 KiB copied a 1 MiB migration chunk
//! several times over fresh pages); a frame of 64 KiB or more (a bulk chunk) into a
//! recycled one (see [`crate::buffers`]). It is always copied: a piece quinn hands out shares the
//! allocation of a whole receive batch, which a small frame kept in a queue would otherwise
//! hold on to.

use bytes::{Bytes, BytesMut};
use quinn::RecvStream;

use crate::buffers::{BulkBuf, MIN_POOLED};

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
    // A bulk chunk (a partition copy's is 1 MiB) goes into a recycled buffer.
    let mut body = BulkBuf::default();
    while body.len() < size {
        match recv.read_chunk(size - body.len(), true).await {
            Ok(Some(chunk)) => {
                if body.capacity() == 0 {
                    // Up to 4 MiB at once; a larger frame grows as it arrives, so what is
                    // allocated follows what was sent.
                    body = BulkBuf::with_capacity(size.min(4 << 20));
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
    Ok(Some(if size >= MIN_POOLED {
        body.freeze()
    } else {
        Bytes::from(std::mem::take(&mut *body))
    }))
}

/// Where a [`FrameReader`] gets its bytes: a QUIC stream (or, in tests, a script).
pub(crate) trait ChunkSource {
    /// At most `max` bytes, as they arrived; `None` at the end of the stream.
    fn chunk(
        &mut self,
        max: usize,
    ) -> impl std::future::Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl ChunkSource for RecvStream {
    async fn chunk(&mut self, max: usize) -> Result<Option<Bytes>, String> {
        self.read_chunk(max, true)
            .await
            .map(|c| c.map(|c| c.bytes))
            .map_err(|e| e.to_string())
    }
}

/// Reads the frames of a stream that carries many small ones (a lane): takes whatever quinn
/// has received at once and cuts the frames out of it, so that a small frame costs no call
/// into quinn (and no lock of the connection) of its own. Each frame is still copied into a
/// buffer of its own, for the reason the module explains. Same checks as [`read_frame`],
/// and the same promise: a frame's buffer is allocated once its first bytes arrive.
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
        src: &mut impl ChunkSource,
        limit: usize,
    ) -> Result<Option<Bytes>, FrameError> {
        while self.held.len() < 4 {
            match src.chunk(usize::MAX).await {
                Ok(Some(chunk)) => self.hold(chunk),
                Ok(None) if self.held.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(FrameError::Truncated {
                        got: self.held.len(),
                        expected: 4,
                    })
                }
                Err(e) => return Err(FrameError::Stream(e)),
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
        let mut body = BytesMut::new();
        let mut more = self.held.slice(4..);
        self.held = Bytes::new();
        loop {
            if !more.is_empty() {
                if body.capacity() == 0 {
                    body.reserve(size.min(4 << 20));
                }
                body.extend_from_slice(&more);
            }
            if body.len() == size {
                return Ok(Some(body.freeze()));
            }
            more = match src.chunk(size - body.len()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Err(FrameError::Truncated {
                        got: body.len(),
                        expected: size,
                    })
                }
                Err(e) => return Err(FrameError::Stream(e)),
            };
        }
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Hands out its pieces as they are, each cut to what the reader asks for at most.
    struct Script(VecDeque<Bytes>);

    impl ChunkSource for Script {
        async fn chunk(&mut self, max: usize) -> Result<Option<Bytes>, String> {
            let Some(mut piece) = self.0.pop_front() else {
                return Ok(None);
            };
            if piece.len() > max {
                self.0.push_front(piece.split_off(max));
            }
            Ok(Some(piece))
        }
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    async fn read_all(
        stream: &[u8],
        cuts: &[usize],
        limit: usize,
    ) -> Result<Vec<Bytes>, FrameError> {
        let mut pieces = VecDeque::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let cut = cut.min(stream.len());
            if cut > at {
                pieces.push_back(Bytes::copy_from_slice(&stream[at..cut]));
                at = cut;
            }
        }
        let mut src = Script(pieces);
        let mut reader = FrameReader::default();
        let mut frames = Vec::new();
        while let Some(f) = reader.next(&mut src, limit).await? {
            frames.push(f);
        }
        Ok(frames)
    }

    /// Every way of cutting a stream of frames into pieces gives back the same frames, and
    /// every cut inside a frame at the end is a truncation, never a frame.
    #[tokio::test]
    async fn frames_come_out_whole_however_the_stream_is_cut() {
        let bodies: Vec<Vec<u8>> = vec![b"a".to_vec(), Vec::new(), vec![7; 300], b"xyz".to_vec()];
        let stream: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).collect();
        for first in 0..=stream.len() {
            for second in (first..=stream.len()).step_by(7) {
                let got = read_all(&stream, &[first, second], 1024).await.unwrap();
                let got: Vec<Vec<u8>> = got.iter().map(|b| b.to_vec()).collect();
                assert_eq!(got, bodies, "cut at {first} and {second}");
            }
            if first > 0 && first < stream.len() {
                let r = read_all(&stream[..first], &[first / 2], 1024).await;
                let whole_frames_end = {
                    let mut at = 0;
                    let mut ends = vec![0];
                    for b in &bodies {
                        at += 4 + b.len();
                        ends.push(at);
                    }
                    ends.contains(&first)
                };
                if whole_frames_end {
                    assert!(
                        r.is_ok(),
                        "a stream ending at a frame boundary ({first}) is clean"
                    );
                } else {
                    assert!(
                        matches!(r, Err(FrameError::Truncated { .. })),
                        "ending at {first}: {r:?}"
                    );
                }
            }
        }
    }

    /// A length over the limit is refused before anything is buffered; a header whose body
    /// never comes is a truncation.
    #[tokio::test]
    async fn lengths_are_checked_and_a_bare_header_is_a_truncation() {
        let r = read_all(&u32::MAX.to_be_bytes(), &[], 1 << 20).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })), "{r:?}");
        let mut src = Script(VecDeque::from([Bytes::copy_from_slice(
            &(1u32 << 20).to_be_bytes(),
        )]));
        let mut reader = FrameReader::default();
        let r = reader.next(&mut src, 2 << 20).await;
        assert!(
            matches!(r, Err(FrameError::Truncated { got: 0, .. })),
            "{r:?}"
        );
    }
}
