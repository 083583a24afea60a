//! The DATA and BDAT decoders: decoding in two pieces split at an arbitrary
//! point must give exactly what decoding in one piece gives, and output that
//! the decoder accepted is wire format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::data::DataDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let split = usize::from(split) * input.len() / 256;
    for bdat in [false, true] {
        let new = || {
            if bdat {
                DataDecoder::for_bdat(1000, 1 << 20)
            } else {
                DataDecoder::for_data(1000, 1 << 20)
            }
        };
        let mut whole = new();
        let mut out_whole = Vec::new();
        let used_whole = whole.decode(input, &mut out_whole);

        let mut pieces = new();
        let mut out_pieces = Vec::new();
        let mut used_pieces = pieces.decode(&input[..split], &mut out_pieces);
        if used_pieces == split {
            used_pieces += pieces.decode(&input[split..], &mut out_pieces);
        }
        assert_eq!(used_whole, used_pieces, "consumed octets differ");
        assert_eq!(out_whole, out_pieces, "output differs");
        assert_eq!(whole.error(), pieces.error());
        assert_eq!(whole.is_finished(), pieces.is_finished());
        assert!(out_whole.len() <= used_whole + 2);

        if bdat {
            whole.finish_bdat(&mut out_whole);
        }
        if whole.is_finished() && whole.error().is_none() {
            assert!(!out_whole.contains(&0));
            for (index, &byte) in out_whole.iter().enumerate() {
                match byte {
                    b'\r' => assert_eq!(out_whole.get(index + 1), Some(&b'\n'), "bare CR accepted"),
                    b'\n' => assert!(
                        index > 0 && out_whole[index - 1] == b'\r',
                        "bare LF accepted"
                    ),
                    _ => {}
                }
            }
        }
    }
});
