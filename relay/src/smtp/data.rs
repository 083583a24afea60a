//! Message data decoders: DATA (dot-unstuffing, `<CRLF>.<CRLF>` end) and BDAT
//! chunks (counted octets), both producing wire-format bytes.
//!
//! Both refuse the SMTP smuggling family (CVE-2023-51764/51765/51766): a bare
//! CR or LF never ends a line and never ends the data; after one is seen the
//! decoder stops producing output but keeps reading until the real end, so
//! whatever follows a fake end-of-data is swallowed as refused content, never
//! parsed as commands.

/// Why a message was refused after its data was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareCrLf,
    /// A NUL octet (not allowed in 7bit or 8bitmime text, RFC 2045 §2.8).
    Nul,
    /// A line longer than the text line limit.
    LineTooLong,
    /// More octets than the maximum message size.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// At the start of a line.
    LineStart,
    /// After a `.` at the start of a line (DATA only).
    Dot,
    /// After `.` CR at the start of a line (DATA only).
    DotCr,
    /// Inside a line.
    Middle,
    /// After a CR inside a line.
    Cr,
}

/// Streaming decoder of message content.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    scan: Scan,
    dot_stuffed: bool,
    line_len: usize,
    max_line: usize,
    max_size: u64,
    size: u64,
    error: Option<DataError>,
    finished: bool,
}

impl DataDecoder {
    /// A decoder for DATA: dot-stuffed, ends at `<CRLF>.<CRLF>`.
    pub fn for_data(max_line: usize, max_size: u64) -> DataDecoder {
        DataDecoder::new(true, max_line, max_size)
    }

    /// A decoder for BDAT chunks: no dot-stuffing, ended by the caller.
    pub fn for_bdat(max_line: usize, max_size: u64) -> DataDecoder {
        DataDecoder::new(false, max_line, max_size)
    }

    fn new(dot_stuffed: bool, max_line: usize, max_size: u64) -> DataDecoder {
        DataDecoder {
            scan: Scan::LineStart,
            dot_stuffed,
            line_len: 0,
            max_line,
            max_size,
            size: 0,
            error: None,
            finished: false,
        }
    }

    /// The first error seen, if any.
    pub fn error(&self) -> Option<DataError> {
        self.error
    }

    /// Octets of message produced so far (including any refused beyond the limit).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether `<CRLF>.<CRLF>` was seen (DATA only).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Decodes from `input`, appending message octets to `out` (nothing once an
    /// error was seen). Returns how many input octets were consumed; for DATA it
    /// stops right after the end-of-data line.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut index = 0;
        while index < input.len() && !self.finished {
            if self.scan == Scan::Middle {
                // Fast path: copy the run of ordinary octets up to the next CR,
                // LF or NUL in one go, when it keeps within the line limit.
                let rest = &input[index..];
                let run = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n' || b == 0)
                    .unwrap_or(rest.len());
                if run > 0 && self.line_len + run <= self.max_line {
                    self.line_len += run;
                    self.emit(&rest[..run], out);
                    index += run;
                    continue;
                }
            }
            let byte = input[index];
            index += 1;
            self.step(byte, out);
        }
        index
    }

    /// Ends a BDAT message: a trailing CR is a bare CR; a last line without
    /// CRLF gets one, so the spool always holds complete lines.
    pub fn finish_bdat(&mut self, out: &mut Vec<u8>) {
        match self.scan {
            Scan::Cr => self.fail(DataError::BareCrLf),
            Scan::Middle => self.emit(b"\r\n", out),
            _ => {}
        }
        self.scan = Scan::LineStart;
        self.finished = true;
    }

    fn step(&mut self, byte: u8, out: &mut Vec<u8>) {
        self.line_len += 1;
        if self.line_len > self.max_line {
            self.fail(DataError::LineTooLong);
        }
        match (self.scan, byte) {
            (Scan::LineStart, b'.') if self.dot_stuffed => self.scan = Scan::Dot,
            (Scan::Dot, b'\r') => self.scan = Scan::DotCr,
            (Scan::DotCr, b'\n') => {
                self.finished = true;
            }
            (Scan::DotCr, other) => {
                // `<CRLF>.<CR>` then anything but LF: a bare CR.
                self.fail(DataError::BareCrLf);
                self.scan = Scan::Middle;
                self.step_middle(other, out);
            }
            (Scan::LineStart | Scan::Dot | Scan::Middle, _) => {
                // A stuffed dot is dropped; the byte after it starts the content.
                self.step_middle(byte, out);
            }
            (Scan::Cr, b'\n') => {
                self.emit(b"\r\n", out);
                self.scan = Scan::LineStart;
                self.line_len = 0;
            }
            (Scan::Cr, other) => {
                self.fail(DataError::BareCrLf);
                self.scan = Scan::Middle;
                self.step_middle(other, out);
            }
        }
    }

    fn step_middle(&mut self, byte: u8, out: &mut Vec<u8>) {
        match byte {
            b'\r' => self.scan = Scan::Cr,
            b'\n' => {
                // A bare LF never ends a line: stay inside it.
                self.fail(DataError::BareCrLf);
                self.scan = Scan::Middle;
            }
            0 => {
                self.fail(DataError::Nul);
                self.scan = Scan::Middle;
            }
            _ => {
                self.emit(&[byte], out);
                self.scan = Scan::Middle;
            }
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.fail(DataError::TooBig);
        }
        if self.error.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn fail(&mut self, error: DataError) {
        // Bare CR/LF outranks the others: it closes the connection.
        match self.error {
            None => self.error = Some(error),
            Some(DataError::BareCrLf) => {}
            Some(_) if error == DataError::BareCrLf => self.error = Some(error),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> (Vec<u8>, usize, DataDecoder) {
        let mut decoder = DataDecoder::for_data(1000, 1 << 20);
        let mut out = Vec::new();
        let used = decoder.decode(input, &mut out);
        (out, used, decoder)
    }

    #[test]
    fn unstuffs_and_stops_at_the_end_line() {
        let (out, used, decoder) = decode_all(b"a\r\n..b\r\n.\r\nMAIL");
        assert_eq!(out, b"a\r\n.b\r\n");
        assert_eq!(used, 11);
        assert!(decoder.is_finished() && decoder.error().is_none());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_result() {
        let input = b"Subject: x\r\n\r\n.hidden\r\n..\r\nend\r\n.\r\n";
        let mut decoder = DataDecoder::for_data(1000, 1 << 20);
        let mut out = Vec::new();
        for byte in input {
            decoder.decode(std::slice::from_ref(byte), &mut out);
        }
        assert!(decoder.is_finished());
        assert_eq!(out, b"Subject: x\r\n\r\nhidden\r\n.\r\nend\r\n");
    }

    #[test]
    fn smuggling_vectors_never_end_the_data() {
        for fake_end in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\r.\r\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\r\n.\r\r\n",
            b"\r\n\0.\r\n",
            b"\r\n.\0\r\n",
        ] {
            let mut input = b"x".to_vec();
            input.extend_from_slice(fake_end);
            input.extend_from_slice(b"MAIL FROM:<e@vil>\r\nDATA\r\nsmuggled\r\n.\r\n");
            let (out, used, decoder) = decode_all(&input);
            assert!(decoder.is_finished(), "{fake_end:?}");
            assert_eq!(
                used,
                input.len(),
                "{fake_end:?}: the real end is the last line"
            );
            assert!(decoder.error().is_some(), "{fake_end:?}");
            assert!(!out.windows(8).any(|w| w == b"smuggled"), "{fake_end:?}");
        }
    }

    #[test]
    fn chunking_never_changes_the_outcome() {
        let inputs: [&[u8]; 6] = [
            b"Subject: a\r\n\r\nbody line\r\n..x\r\n.\r\n",
            b"abc\ndef\r\n.\r\n",
            b"abc\r\n.\rx\r\n.\r\n",
            b"0123456789012345\r\n.\r\n",
            b"nul\0here\r\n.\r\n",
            b"\r\n\r\n.\r\n",
        ];
        for input in inputs {
            let run = |chunk: usize| {
                let mut decoder = DataDecoder::for_data(12, 1 << 20);
                let mut out = Vec::new();
                let mut used = 0;
                for piece in input.chunks(chunk) {
                    used += decoder.decode(piece, &mut out);
                }
                (out, used, decoder.error(), decoder.is_finished())
            };
            let whole = run(input.len());
            for chunk in [1, 2, 3, 5, 7] {
                assert_eq!(run(chunk), whole, "{input:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn long_line_and_size() {
        let mut decoder = DataDecoder::for_data(10, 1 << 20);
        let mut out = Vec::new();
        decoder.decode(b"0123456789abc\r\n.\r\n", &mut out);
        assert_eq!(decoder.error(), Some(DataError::LineTooLong));
        let mut decoder = DataDecoder::for_data(1000, 4);
        decoder.decode(b"12345\r\n.\r\n", &mut out);
        assert_eq!(decoder.error(), Some(DataError::TooBig));
        assert!(decoder.is_finished());
    }

    #[test]
    fn bdat_keeps_dots_and_completes_the_last_line() {
        let mut decoder = DataDecoder::for_bdat(1000, 1 << 20);
        let mut out = Vec::new();
        decoder.decode(b".a\r\n.\r\nb", &mut out);
        decoder.finish_bdat(&mut out);
        assert_eq!(out, b".a\r\n.\r\nb\r\n");
        assert!(decoder.error().is_none());
        let mut decoder = DataDecoder::for_bdat(1000, 1 << 20);
        decoder.decode(b"a\nb\r\n", &mut out);
        assert_eq!(decoder.error(), Some(DataError::BareCrLf));
    }
}
