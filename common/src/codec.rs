//! The one place that knows how messages are encoded on the wire.
//!
//! Every control message travels as a *frame*:
//!
//! ```text
//! +---------+----------------+-------------------------------+
//! | version | length (u32 BE)| payload (bincode 2, serde)    |
//! | 1 byte  | 4 bytes        | `length` bytes, <= MAX_FRAME  |
//! +---------+----------------+-------------------------------+
//! ```
//!
//! bincode is unmaintained (RUSTSEC-2025-0141) and pinned to `=2.0.1`; keeping it behind this
//! module, with our own version byte and our own size limit checked *before* anything is
//! allocated, means it can be swapped for another encoding by bumping [`PROTOCOL_VERSION`].
//! Table contents never go through this codec: they follow a `Prepare` frame as raw bytes.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version byte that starts every frame. Bump it when the message types change incompatibly.
pub const PROTOCOL_VERSION: u8 = 2;

/// Largest payload accepted in one frame (control messages only; tables are streamed raw).
pub const MAX_FRAME: usize = 256 * 1024;

/// What can go wrong encoding or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}")]
    Version {
        /// The version byte received.
        got: u8,
    },
    /// The announced frame is larger than [`MAX_FRAME`]; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Decode(String),
    /// The message could not be encoded (a bug, or a message over the limit).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The stream failed or ended early.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Checks a frame header (version byte, announced length) before anything is allocated.
fn payload_len(header: &[u8; 5]) -> Result<usize, CodecError> {
    if header[0] != PROTOCOL_VERSION {
        return Err(CodecError::Version { got: header[0] });
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(CodecError::TooLarge { len: len as u64 });
    }
    Ok(len)
}

/// Encodes `msg` as one complete frame (header included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if payload.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: payload.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one payload (without header). Trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    if payload.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: payload.len() as u64,
        });
    }
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Decodes one complete frame held in memory.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    if frame.len() < 5 {
        return Err(CodecError::Decode(
            "frame shorter than its 5-byte header".into(),
        ));
    }
    let len = payload_len(&[frame[0], frame[1], frame[2], frame[3], frame[4]])?;
    if frame.len() - 5 != len {
        return Err(CodecError::Decode(format!(
            "frame header announces {len} bytes, {} present",
            frame.len() - 5
        )));
    }
    decode_payload(&frame[5..])
}

/// Writes one frame to an async stream.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), CodecError> {
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame from an async stream, refusing oversized frames before allocating.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, CodecError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let mut payload = vec![0u8; payload_len(&header)?];
    r.read_exact(&mut payload).await?;
    decode_payload(&payload)
}

/// Reads one frame from a blocking reader (the local Unix socket of `txmap-sympa`).
pub fn read_frame_blocking<R: std::io::Read, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, CodecError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header)?;
    let mut payload = vec![0u8; payload_len(&header)?];
    r.read_exact(&mut payload)?;
    decode_payload(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A { x: u64, s: String },
        B(Vec<u8>),
    }

    #[test]
    fn round_trips_a_message() {
        let m = Msg::A {
            x: 7,
            s: "sympa_transport".into(),
        };
        let f = encode(&m).unwrap();
        assert_eq!(f[0], PROTOCOL_VERSION);
        assert_eq!(decode::<Msg>(&f).unwrap(), m);
    }

    #[test]
    fn rejects_another_version() {
        let mut f = encode(&Msg::B(vec![1, 2])).unwrap();
        f[0] = 99;
        assert!(matches!(
            decode::<Msg>(&f),
            Err(CodecError::Version { got: 99 })
        ));
    }

    #[test]
    fn rejects_an_oversized_length_before_reading_it() {
        let mut f = vec![PROTOCOL_VERSION];
        f.extend_from_slice(&(2u32 * 1024 * 1024 * 1024 - 1).to_be_bytes());
        assert!(matches!(
            decode::<Msg>(&f),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_a_vector_whose_inner_length_lies() {
        // Inner length prefix claims 2^40 elements in a tiny payload: must fail, not allocate.
        let mut payload = vec![1u8]; // variant B
        payload.push(253); // varint u64 marker
        payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_payload::<Msg>(&payload).is_err());
    }

    #[test]
    fn rejects_trailing_bytes_and_garbage() {
        let mut f = encode(&Msg::B(vec![1])).unwrap();
        f.push(0);
        let len = (f.len() - 5) as u32;
        f[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(decode::<Msg>(&f).is_err());
        assert!(decode::<Msg>(&[PROTOCOL_VERSION, 0, 0, 0, 2, 200, 200]).is_err());
    }

    #[tokio::test]
    async fn reads_frames_from_a_stream() {
        let m = Msg::A {
            x: 1,
            s: "x".into(),
        };
        let f = encode(&m).unwrap();
        let mut r = &f[..];
        assert_eq!(read_frame::<_, Msg>(&mut r).await.unwrap(), m);
    }
}
