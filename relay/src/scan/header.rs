//! Header lines from a scanner, made safe to prepend: a field name of
//! printable ASCII without `:`, a value whose line breaks become CRLF
//! followed by whitespace (folding), nothing that could end the header.

/// Formats `name: value` as one (maybe folded) CRLF-terminated header
/// line; `None` when the name is not a field name.
pub fn format(name: &str, value: &str) -> Option<String> {
    let name = name.trim();
    let valid_name = !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
    if !valid_name {
        return None;
    }
    let mut out = format!("{name}:");
    for (index, line) in value
        .split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.trim().is_empty())
        .enumerate()
    {
        // 7-bit and printable: the message may go out without 8BITMIME.
        let line: String = line
            .chars()
            .filter(|c| *c != '\r')
            .map(|c| {
                if c == '\t' || (' '..='~').contains(&c) {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if index == 0 {
            out.push(' ');
            out.push_str(line.trim_start());
        } else {
            out.push_str("\r\n");
            if !line.starts_with([' ', '\t']) {
                out.push('\t');
            }
            out.push_str(&line);
        }
    }
    out.push_str("\r\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_value() {
        assert_eq!(format("X-Spam", "Yes").as_deref(), Some("X-Spam: Yes\r\n"));
    }

    #[test]
    fn line_breaks_are_folded_and_blank_lines_dropped() {
        assert_eq!(
            format(
                "X-Spamd-Result",
                "default: False [0.00 / 15.00];\n\n SYM(0.00)[a]\nMORE"
            )
            .as_deref(),
            Some("X-Spamd-Result: default: False [0.00 / 15.00];\r\n SYM(0.00)[a]\r\n\tMORE\r\n")
        );
    }

    #[test]
    fn a_value_cannot_end_the_header_or_inject_a_field() {
        let line = format("X-A", "v\r\n\r\nBody\r\nX-Injected: 1").unwrap();
        assert_eq!(line, "X-A: v\r\n\tBody\r\n\tX-Injected: 1\r\n");
        assert!(!line.contains("\r\n\r\n"));
    }

    #[test]
    fn values_are_seven_bit_and_without_controls() {
        assert_eq!(
            format("X-A", "caf\u{e9}\0!\tok").as_deref(),
            Some("X-A: caf??!\tok\r\n")
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "X A", "X:A", "Ünicode"] {
            assert_eq!(format(name, "v"), None, "{name:?}");
        }
    }
}
