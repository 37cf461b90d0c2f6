//! Framing of the frontend/backend protocol over TCP or TLS, with buffers that survive
//! cancellation. Reference: doc/src/sgml/protocol.sgml ("Message Formats").
//!
//! Reads go into an internal buffer and a message is taken out only when it is complete, so a
//! `read_message` future dropped half-way (e.g. in `tokio::select!`) loses nothing. Writes are
//! queued and drained with `write_buf`, which accounts for partial writes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, ErrorResponseBody, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::ReplicationError;

/// Upper bound for one backend message; walsender messages are at most a few hundred KiB, so a
/// larger length means a corrupt stream, not a reason to allocate.
const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;
/// How much the read buffer grows by when it runs low.
const READ_CHUNK: usize = 256 * 1024;
/// `CopyBothResponse`, which `postgres-protocol` does not parse.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

pub(crate) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A backend message, including the one `postgres-protocol` does not know.
pub(crate) enum Backend {
    Message(Message),
    CopyBothResponse,
}

pub(crate) struct Connection {
    transport: Transport,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl Connection {
    pub(crate) fn new(transport: Transport) -> Self {
        Connection {
            transport,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// Buffer to append frontend messages to; sent by [`Connection::flush`].
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Sends everything queued. Cancellation-safe: unsent bytes stay queued.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        while self.write_buf.has_remaining() {
            let n = self.transport.write_buf(&mut self.write_buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
        }
        self.transport.flush().await?;
        Ok(())
    }

    /// The next backend message where a CopyBothResponse cannot legitimately
    /// appear; `context` names the phase in the protocol error if one does.
    /// Cancellation-safe.
    pub(crate) async fn read_regular(
        &mut self,
        context: &str,
    ) -> Result<Message, ReplicationError> {
        match self.read_message().await? {
            Backend::Message(m) => Ok(m),
            Backend::CopyBothResponse => Err(ReplicationError::protocol(format!(
                "unexpected CopyBothResponse {context}"
            ))),
        }
    }

    /// The next complete backend message. Cancellation-safe.
    pub(crate) async fn read_message(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(msg) = self.parse_buffered()? {
                return Ok(msg);
            }
            // Room for many messages per read: reserving only what one
            // message lacks would move the unread bytes to a new buffer at
            // almost every read (parsed messages still share the old one),
            // copying the whole stream once more.
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                self.read_buf.reserve(READ_CHUNK);
            }
            let n = self.transport.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection unexpectedly",
                )
                .into());
            }
        }
    }

    /// Asks the kernel not to report the socket readable until `bytes`
    /// have arrived (1, the default: any byte). Lowering it reports what is
    /// already waiting at once: Linux checks the new mark when it is set
    /// since 4.18, so on an older kernel (or elsewhere) a raise is not made
    /// and the call does nothing. A raise is also kept to a quarter of the
    /// socket's receive buffer: a mark the buffer could not hold twice over
    /// would make the kernel grow the buffer and clamp the TCP window to
    /// the mark for the rest of the connection.
    pub(crate) fn set_read_low_water(&self, bytes: usize) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        if !low_water_wakes() {
            return Ok(());
        }
        let fd = match &self.transport {
            Transport::Plain(s) => s.as_raw_fd(),
            Transport::Tls(s) => s.get_ref().0.as_raw_fd(),
        };
        let mut value = libc::c_int::try_from(bytes.max(1)).unwrap_or(libc::c_int::MAX);
        if value > 1 {
            value = value.min(socket_option(fd, libc::SO_RCVBUF)? / 4).max(1);
        }
        // SAFETY: `fd` is this connection's socket, open for as long as
        // `self` is borrowed; the option value is a c_int that lives across
        // the call, and its size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether a whole message waits in the read buffer (the next read
    /// needs no socket read).
    pub(crate) fn has_buffered_message(&self) -> bool {
        self.read_buf.len() >= 5 && {
            let len = u32::from_be_bytes([
                self.read_buf[1],
                self.read_buf[2],
                self.read_buf[3],
                self.read_buf[4],
            ]) as usize;
            self.read_buf.len() > len
        }
    }

    fn parse_buffered(&mut self) -> Result<Option<Backend>, ReplicationError> {
        if self.read_buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([
            self.read_buf[1],
            self.read_buf[2],
            self.read_buf[3],
            self.read_buf[4],
        ]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(ReplicationError::protocol(format!(
                "invalid message length {len} (tag {:?})",
                char::from(self.read_buf[0])
            )));
        }
        if self.read_buf.len() < len + 1 {
            self.read_buf.reserve(len + 1 - self.read_buf.len());
            return Ok(None);
        }
        if self.read_buf[0] == COPY_BOTH_RESPONSE_TAG {
            self.read_buf.advance(len + 1);
            return Ok(Some(Backend::CopyBothResponse));
        }
        match Message::parse(&mut self.read_buf) {
            Ok(Some(msg)) => Ok(Some(Backend::Message(msg))),
            Ok(None) => Ok(None),
            Err(e) => Err(ReplicationError::protocol(format!(
                "bad backend message: {e}"
            ))),
        }
    }

    /// Reads one byte straight from the socket (the answer to SSLRequest). Nothing may be
    /// buffered at that point, or a man in the middle could inject plaintext (CVE-2021-23222).
    pub(crate) async fn read_ssl_answer(stream: &mut TcpStream) -> Result<u8, ReplicationError> {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await?;
        Ok(b[0])
    }
}

/// Turns an ErrorResponse into a [`ReplicationError::Server`].
pub(crate) fn server_error(body: &ErrorResponseBody) -> ReplicationError {
    let mut severity = None;
    let mut localized_severity = None;
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    let mut fields = body.fields();
    loop {
        match fields.next() {
            Ok(Some(field)) => {
                let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                match field.type_() {
                    b'V' => severity = Some(value),
                    b'S' => localized_severity = Some(value),
                    b'C' => code = value,
                    b'M' => message = value,
                    b'D' => detail = Some(value),
                    b'H' => hint = Some(value),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                return ReplicationError::protocol(format!("malformed ErrorResponse: {e}"));
            }
        }
    }
    ReplicationError::Server {
        severity: severity
            .or(localized_severity)
            .unwrap_or_else(|| "ERROR".into()),
        code,
        message,
        detail,
        hint,
    }
}

/// The columns of a DataRow (text format), NULL as `None`; values share the message's buffer.
pub(crate) fn data_row_columns(row: &DataRowBody) -> Result<Vec<Option<Bytes>>, ReplicationError> {
    let storage = row.buffer_bytes();
    let mut cols = Vec::new();
    let mut ranges = row.ranges();
    loop {
        match ranges.next() {
            Ok(Some(Some(range))) => {
                if range.end > storage.len() {
                    return Err(ReplicationError::protocol("truncated DataRow"));
                }
                cols.push(Some(storage.slice(range)));
            }
            Ok(Some(None)) => cols.push(None),
            Ok(None) => return Ok(cols),
            Err(e) => {
                return Err(ReplicationError::protocol(format!(
                    "malformed DataRow: {e}"
                )))
            }
        }
    }
}

/// An integer socket option of `fd` at `SOL_SOCKET`.
fn socket_option(fd: std::os::fd::RawFd, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket of the caller's; `value` and `len`
    // live across the call and `len` holds `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether lowering `SO_RCVLOWAT` reports data already waiting: Linux
/// 4.18 and later. Read once from the running kernel's release.
fn low_water_wakes() -> bool {
    static WAKES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WAKES.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .and_then(|release| kernel_at_least(&release, (4, 18)))
            .unwrap_or(false)
    })
}

/// Whether a kernel release such as `6.1.0-18-amd64` is at least `want`.
fn kernel_at_least(release: &str, want: (u32, u32)) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse::<u32>().ok()?;
    let minor = parts.next()?.parse::<u32>().ok()?;
    Some((major, minor) >= want)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_releases_are_compared_by_major_and_minor() {
        assert_eq!(
            super::kernel_at_least("6.1.0-18-amd64", (4, 18)),
            Some(true)
        );
        assert_eq!(
            super::kernel_at_least("4.18.0-553.el8_10.x86_64", (4, 18)),
            Some(true)
        );
        assert_eq!(super::kernel_at_least("4.9.337", (4, 18)), Some(false));
        assert_eq!(
            super::kernel_at_least("3.10.0-1160.el7.x86_64\n", (4, 18)),
            Some(false)
        );
        assert_eq!(super::kernel_at_least("garbage", (4, 18)), None);
    }

    use super::*;
    use tokio::net::TcpListener;

    /// A CopyData message holding `body`.
    fn copy_data(body: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Messages read together are handed out one by one, and the buffer
    /// says whether the next one is there whole; half a message is not.
    #[tokio::test]
    async fn a_buffered_message_is_reported_only_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(Transport::Plain(client));
        assert!(!conn.has_buffered_message());

        let second = copy_data(b"second");
        let mut sent = copy_data(b"first");
        sent.extend_from_slice(&second);
        sent.extend_from_slice(&second[..4]);
        server.write_all(&sent).await.unwrap();
        // One write of a few bytes on loopback arrives in one piece: the
        // first read takes in all of it.
        match conn.read_message().await.unwrap() {
            Backend::Message(Message::CopyData(body)) => assert_eq!(body.data(), b"first"),
            _ => panic!("not CopyData"),
        }
        assert!(conn.has_buffered_message());
        match conn.read_message().await.unwrap() {
            Backend::Message(Message::CopyData(body)) => assert_eq!(body.data(), b"second"),
            _ => panic!("not CopyData"),
        }
        // What is left is the start of a third message: not one to read.
        assert!(!conn.has_buffered_message());
        server.write_all(&second[4..]).await.unwrap();
        match conn.read_message().await.unwrap() {
            Backend::Message(Message::CopyData(body)) => assert_eq!(body.data(), b"second"),
            _ => panic!("not CopyData"),
        }
        assert!(!conn.has_buffered_message());
    }
}
