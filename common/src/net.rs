//! One request/response exchange over a fresh bidirectional QUIC stream.

use crate::codec::{self, CodecError};
use crate::proto::{Request, Response};
use tokio::io::AsyncRead;

/// Errors of one exchange.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the stream or the connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending failed.
    #[error("send: {0}")]
    Write(#[from] quinn::WriteError),
    /// Finishing the stream failed.
    #[error("send: stream closed")]
    Closed(#[from] quinn::ClosedStream),
    /// Encoding or decoding failed.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// Reading the body to send failed.
    #[error("reading the table to send: {0}")]
    Body(std::io::Error),
}

/// Sends `req` (followed by `body`, if any, streamed in chunks) and reads one response.
///
/// A participant that refuses a prepare early stops reading the body; the refusal it sends is
/// still read and returned, rather than the write error.
pub async fn exchange<B: AsyncRead + Unpin>(
    conn: &quinn::Connection,
    req: &Request,
    body: Option<B>,
) -> Result<Response, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let sent = send_all(&mut send, req, body).await;
    match sent {
        Ok(()) => {}
        Err(NetError::Write(quinn::WriteError::Stopped(_))) => {}
        Err(e) => return Err(e),
    }
    Ok(codec::read_frame(&mut recv).await?)
}

async fn send_all<B: AsyncRead + Unpin>(
    send: &mut quinn::SendStream,
    req: &Request,
    body: Option<B>,
) -> Result<(), NetError> {
    send.write_all(&codec::encode(req)?).await?;
    if let Some(mut body) = body {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = body.read(&mut buf).await.map_err(NetError::Body)?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await?;
        }
    }
    send.finish()?;
    Ok(())
}

/// Sends a `Fetch` and, when the answer is `Source`, writes exactly the announced bytes to
/// `dest` and checks their sha256. Any other answer is returned as is, with nothing written.
pub async fn fetch(
    conn: &quinn::Connection,
    req: &Request,
    dest: &std::path::Path,
) -> Result<Response, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&codec::encode(req)?).await?;
    send.finish()?;
    let resp: Response = codec::read_frame(&mut recv).await?;
    let Response::Source { len, sha256 } = &resp else {
        return Ok(resp);
    };
    let bad = |m: String| NetError::Body(std::io::Error::new(std::io::ErrorKind::InvalidData, m));
    let mut f = std::fs::File::create(dest).map_err(NetError::Body)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    while let Some(chunk) = recv
        .read_chunk(256 * 1024, true)
        .await
        .map_err(|e| bad(e.to_string()))?
    {
        got += chunk.bytes.len() as u64;
        if got > *len {
            return Err(bad(format!("more than the announced {len} bytes")));
        }
        ctx.update(&chunk.bytes);
        std::io::Write::write_all(&mut f, &chunk.bytes).map_err(NetError::Body)?;
    }
    f.sync_all().map_err(NetError::Body)?;
    if got != *len || ctx.finish().as_ref() != sha256.0 {
        return Err(bad(format!(
            "received {got} of {len} bytes, or a different sha256"
        )));
    }
    Ok(resp)
}

/// True when the connection settled on protocol 3 ([`crate::proto::ALPN_DELTA`]): the peer
/// takes [`Request::PrepareDelta`].
pub fn speaks_delta(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == crate::proto::ALPN_DELTA)
}
