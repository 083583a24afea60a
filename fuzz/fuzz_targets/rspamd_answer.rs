//! rspamd's answers: whatever comes back over HTTP, Postern either has a
//! verdict or a scan failure, and headers it would add are well-formed
//! header lines that cannot end the header or carry 8-bit octets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::scan::rspamd::answer;
use postern::scan::Verdict;

fuzz_target!(|data: &[u8]| {
    let Ok(verdict) = answer(data) else {
        return;
    };
    match verdict {
        Verdict::Accept { headers } => {
            assert!(headers.is_empty() || headers.ends_with("\r\n"));
            assert!(!headers.contains("\r\n\r\n"), "{headers:?}");
            assert!(!headers.starts_with([' ', '\t']), "{headers:?}");
            for line in headers.split_terminator("\r\n") {
                assert!(!line.contains(['\r', '\n']), "{line:?}");
                assert!(line.bytes().all(|b| b == b'\t' || (32..127).contains(&b)));
            }
        }
        Verdict::Tempfail(reply) => assert_eq!(reply.code / 100, 4),
        Verdict::Reject(reply) => assert_eq!(reply.code / 100, 5),
    }
});
