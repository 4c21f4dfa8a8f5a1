//! Container logs: Docker's multiplexed stream format and the timestamps it prefixes.
//!
//! Without a TTY the Engine frames each chunk as `[stream, 0, 0, 0, size (u32 big-endian)]` followed by `size`
//! bytes, stream 1 being stdout and 2 stderr. With `timestamps=1` every line starts with an RFC 3339 time and a
//! space.

use bytes::{Buf, BytesMut};

use crate::LogLine;

/// Splits Docker's multiplexed log stream into lines, whatever the chunking of the bytes that arrive.
#[derive(Default)]
pub struct Demux {
    buf: BytesMut,
    /// Bytes of a line not yet ended, per stream (stdout, stderr).
    partial: [Vec<u8>; 2],
}

impl Demux {
    /// Feeds bytes; returns the complete lines they finish, as (stream name, line with its timestamp prefix).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<(&'static str, String)> {
        self.buf.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while self.buf.len() >= 8 {
            let size =
                u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
            if self.buf.len() < 8 + size {
                break;
            }
            let kind = self.buf[0];
            self.buf.advance(8);
            let payload = self.buf.split_to(size);
            let (slot, name) = match kind {
                2 => (1, "stderr"),
                _ => (0, "stdout"),
            };
            let partial = &mut self.partial[slot];
            for &b in payload.iter() {
                if b == b'\n' {
                    let line = String::from_utf8_lossy(partial)
                        .trim_end_matches('\r')
                        .to_string();
                    lines.push((name, line));
                    partial.clear();
                } else {
                    partial.push(b);
                }
            }
        }
        lines
    }

    /// The unterminated lines left when the stream ends.
    pub fn finish(&mut self) -> Vec<(&'static str, String)> {
        let mut lines = Vec::new();
        for (slot, name) in [(0, "stdout"), (1, "stderr")] {
            if !self.partial[slot].is_empty() {
                lines.push((
                    name,
                    String::from_utf8_lossy(&self.partial[slot]).to_string(),
                ));
                self.partial[slot].clear();
            }
        }
        lines
    }
}

/// Turns a `<RFC 3339 time> <text>` line into a [`LogLine`]; a line without a parsable time gets `now`.
pub fn parse_line(replica: u32, stream: &str, raw: &str) -> LogLine {
    let (time, line) = match raw.split_once(' ') {
        Some((t, rest)) => match t.parse::<jiff::Timestamp>() {
            Ok(time) => (time, rest),
            Err(_) => (jiff::Timestamp::now(), raw),
        },
        None => match raw.parse::<jiff::Timestamp>() {
            Ok(time) => (time, ""),
            Err(_) => (jiff::Timestamp::now(), raw),
        },
    };
    LogLine {
        time,
        replica,
        stream: stream.to_string(),
        line: line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &str) -> Vec<u8> {
        let mut v = vec![kind, 0, 0, 0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload.as_bytes());
        v
    }

    #[test]
    fn demultiplexes_across_chunk_boundaries() {
        let mut bytes = frame(1, "2024-01-02T03:04:05.000000006Z hello\n");
        bytes.extend(frame(2, "2024-01-02T03:04:06Z oops\r\n"));
        bytes.extend(frame(1, "no newline "));
        bytes.extend(frame(1, "yet\nlast"));
        let mut demux = Demux::default();
        let mut lines = Vec::new();
        // One byte at a time: the worst chunking there is.
        for b in &bytes {
            lines.extend(demux.push(std::slice::from_ref(b)));
        }
        lines.extend(demux.finish());
        let lines: Vec<(&str, &str)> = lines.iter().map(|(s, l)| (*s, l.as_str())).collect();
        assert_eq!(
            lines,
            [
                ("stdout", "2024-01-02T03:04:05.000000006Z hello"),
                ("stderr", "2024-01-02T03:04:06Z oops"),
                ("stdout", "no newline yet"),
                ("stdout", "last"),
            ]
        );
    }

    #[test]
    fn parses_timestamps() {
        let l = parse_line(1, "stdout", "2024-01-02T03:04:05.000000006Z GET /");
        assert_eq!(l.line, "GET /");
        assert_eq!(l.replica, 1);
        assert_eq!(l.time.to_string(), "2024-01-02T03:04:05.000000006Z");
        let l = parse_line(0, "stderr", "not a time");
        assert_eq!(l.line, "not a time");
    }
}
