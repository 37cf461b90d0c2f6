//! Where Strata's log goes: standard error, one line per record.
//!
//! A record can quote what a client sent (an action name, an id, a server's
//! error text); a CR or LF in it would start a line the reader takes for a
//! record of its own. The formatter hands each record over in one write, so
//! the writer escapes every CR, and every LF but the record's last, and a
//! record stays one line whatever it quotes.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Makes [`OneLine`] writers to standard error.
pub struct StderrOneLine;

impl<'a> MakeWriter<'a> for StderrOneLine {
    type Writer = OneLine<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLine(io::stderr())
    }
}

/// Writes each buffer it is given as one line: CR as `\r`, LF as `\n`, the
/// final LF kept.
pub struct OneLine<W: Write>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_one_line() {
        let mut w = OneLine(Vec::new());
        w.write_all(b"INFO refused: Specified api X\r\nFAKE LOG LINE\n")
            .unwrap();
        w.write_all(b"INFO ok\n").unwrap();
        w.write_all(b"no newline\nat end").unwrap();
        assert_eq!(
            String::from_utf8(w.0).unwrap(),
            "INFO refused: Specified api X\\r\\nFAKE LOG LINE\nINFO ok\nno newline\\nat end"
        );
    }
}
