//! The client write timeout: a connection whose writes make no progress for too long (a client
//! that stopped reading, with every buffer between full) is closed, so it cannot hold a
//! connection, its response and the replica's stream without bound.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Counter: client connections closed because a write made no progress within the timeout.
pub const WRITE_TIMEOUTS_COUNTER: &str = "gateway_client_write_timeouts_total";

/// An I/O object whose writes fail with [`io::ErrorKind::TimedOut`] once one has waited (made no
/// progress) for `timeout`. Reads pass through; a write that makes progress resets the clock.
/// Like nginx's `send_timeout`: the limit is between two successful writes, not on the whole
/// response, so a long stream read at any pace keeps going.
#[pin_project]
#[derive(Debug)]
pub struct WriteTimeout<T> {
    #[pin]
    io: T,
    timeout: Duration,
    /// The deadline of the write now waiting (allocated on the first stall, then reused).
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` runs for the write now waiting.
    armed: bool,
}

impl<T> WriteTimeout<T> {
    /// Wraps `io`; a zero `timeout` turns the limit off.
    pub fn new(io: T, timeout: Duration) -> Self {
        WriteTimeout {
            io,
            timeout,
            stall: None,
            armed: false,
        }
    }

    /// Runs one write-side poll of the inner I/O: progress stops the clock; waiting starts it
    /// (on the first pending poll) and, once it has run out, fails the write.
    fn bounded<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let this = self.project();
        match op(this.io, cx) {
            Poll::Ready(r) => {
                *this.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending if this.timeout.is_zero() => Poll::Pending,
            Poll::Pending => {
                let deadline = Instant::now() + *this.timeout;
                let sleep = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    sleep.as_mut().reset(deadline);
                    *this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        *this.armed = false;
                        metrics::counter!(WRITE_TIMEOUTS_COUNTER).increment(1);
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client write made no progress within the write timeout",
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.bounded(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.bounded(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.bounded(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_nobody_reads_times_out_and_one_that_moves_does_not() {
        // A pipe of 1 KiB that nobody reads: the second kilobyte waits.
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = WriteTimeout::new(a, Duration::from_millis(50));
        w.write_all(&[0u8; 1024]).await.unwrap();
        let err = w.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // A reader slower than the timeout in total, but never stalling that long, is served.
        let (a, mut r) = tokio::io::duplex(1024);
        let mut w = WriteTimeout::new(a, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 8192 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += r.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&[1u8; 8192]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 8192);
        drop(b.read(&mut [0u8; 1]).await);
    }

    #[tokio::test]
    async fn zero_turns_it_off() {
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WriteTimeout::new(a, Duration::ZERO);
        w.write_all(&[0u8; 16]).await.unwrap();
        let blocked =
            tokio::time::timeout(Duration::from_millis(100), w.write_all(&[0u8; 16])).await;
        assert!(blocked.is_err(), "still waiting, no error");
    }
}
