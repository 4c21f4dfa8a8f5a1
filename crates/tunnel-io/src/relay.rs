//! Copying between a tunnel stream and another connection.

use tokio::io::{AsyncRead, AsyncWrite};

/// The buffer each direction of a [`relay`] reads into. A bulk transfer then moves in `Data` frames of the
/// session's largest size and in few system calls on the other connection (tokio's own default, 8 KiB,
/// costs a frame and a system call per 8 KiB).
pub const RELAY_BUFFER: usize = 256 * 1024;

/// Copies both ways between `a` and `b` until both directions ended (each half-closes the other side when its
/// source ends); the bytes moved from `a` to `b` and from `b` to `a`.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}
