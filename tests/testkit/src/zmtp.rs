//! A hand-driven ZMTP 3.0 peer over a raw TCP stream (NULL mechanism), for tests
//! that must do what no ZeroMQ library would: announce frames they never send,
//! stop reading, pose as a broker. Written from RFC 23 (ZMTP 3.0).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One raw ZMTP connection after its handshake.
pub struct Zmtp {
    pub stream: TcpStream,
}

/// The nine bytes of a frame header with the long flag announcing 2^35 bytes:
/// a process that allocates what a header announces aborts on them.
pub const OVERSIZE_HEADER: [u8; 9] = [0x02, 0, 0, 0, 0x08, 0, 0, 0, 0];

fn greeting() -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    g.extend_from_slice(b"NULL");
    g.resize(64, 0);
    g
}

fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut cmd = vec![0x04, body.len() as u8];
    cmd.extend(body);
    cmd
}

impl Zmtp {
    /// Connects to `endpoint` (`tcp://host:port`) and completes the handshake as a
    /// `socket_type` (`DEALER`, `SUB`, …).
    pub fn connect(endpoint: &str, socket_type: &str) -> std::io::Result<Zmtp> {
        let s = TcpStream::connect(endpoint.trim_start_matches("tcp://"))?;
        Zmtp::handshake(s, socket_type)
    }

    /// Completes the handshake on an accepted or connected stream.
    pub fn handshake(s: TcpStream, socket_type: &str) -> std::io::Result<Zmtp> {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut z = Zmtp { stream: s };
        z.stream.write_all(&greeting())?;
        let mut peer = [0u8; 64];
        z.stream.read_exact(&mut peer)?;
        if peer[0] != 0xFF || peer[9] != 0x7F {
            return Err(std::io::Error::other("not a ZMTP greeting"));
        }
        z.stream.write_all(&ready(socket_type))?;
        // The peer's READY.
        let (flags, _) = z.read_frame()?;
        if flags & 0x04 == 0 {
            return Err(std::io::Error::other("expected the peer's READY command"));
        }
        Ok(z)
    }

    /// Sends one message of `frames`.
    pub fn send(&mut self, frames: &[&[u8]]) -> std::io::Result<()> {
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let more = if i + 1 < frames.len() { 0x01 } else { 0 };
            if f.len() > 255 {
                out.push(0x02 | more);
                out.extend_from_slice(&(f.len() as u64).to_be_bytes());
            } else {
                out.push(more);
                out.push(f.len() as u8);
            }
            out.extend_from_slice(f);
        }
        self.stream.write_all(&out)
    }

    /// Reads one frame: its flags and body.
    pub fn read_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut flags = [0u8; 1];
        self.stream.read_exact(&mut flags)?;
        let len = if flags[0] & 0x02 != 0 {
            let mut l = [0u8; 8];
            self.stream.read_exact(&mut l)?;
            u64::from_be_bytes(l)
        } else {
            let mut l = [0u8; 1];
            self.stream.read_exact(&mut l)?;
            l[0] as u64
        };
        if len > 64 * 1024 * 1024 {
            return Err(std::io::Error::other(format!("a frame of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body)?;
        Ok((flags[0], body))
    }

    /// Reads one message, skipping commands (PING).
    pub fn recv(&mut self) -> std::io::Result<Vec<Vec<u8>>> {
        let mut frames = Vec::new();
        loop {
            let (flags, body) = self.read_frame()?;
            if flags & 0x04 != 0 {
                continue;
            }
            frames.push(body);
            if flags & 0x01 == 0 {
                return Ok(frames);
            }
        }
    }

    /// Writes [`OVERSIZE_HEADER`] and waits until the peer closes or `wait` passes.
    /// `Ok(true)` if the peer closed the connection.
    pub fn oversize_header(&mut self, wait: Duration) -> std::io::Result<bool> {
        self.stream.write_all(&OVERSIZE_HEADER)?;
        self.stream.flush()?;
        self.stream.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
                Err(_) => return Ok(false),
            }
        }
    }
}
