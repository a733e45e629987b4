//! The record decoder against arbitrary and mutated bytes: it never panics,
//! never allocates from a forged length, and never accepts a changed record.

use bytes::Bytes;
use halfmq_storage::record::check_frame;
use halfmq_storage::{Record, RecordKind};
use proptest::prelude::*;

fn valid() -> Vec<u8> {
    Record {
        kind: RecordKind::Normal,
        topic: "fuzz".into(),
        tag: "t".into(),
        keys: vec!["a".into(), "bb".into()],
        properties: vec![("k".into(), "v".into())],
        body: Bytes::from_static(b"the body of a record"),
        ..Record::default()
    }
    .encode()
    .unwrap()
}

/// 20,000 cases per property in CI; `HALFMQ_FUZZ_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("HALFMQ_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = check_frame(&bytes, 0);
        let _ = Record::decode(Bytes::from(bytes), 0);
    }

    #[test]
    fn mutated_records_are_rejected(pos in 0usize..10_000, xor in 1u8..=255, cut in 0usize..10_000) {
        let enc = valid();
        let mut bad = enc.clone();
        let p = pos % bad.len();
        bad[p] ^= xor;
        prop_assert!(Record::decode(Bytes::from(bad), 0).is_err(), "changed byte {p} accepted");
        let c = cut % enc.len();
        prop_assert!(Record::decode(Bytes::copy_from_slice(&enc[..c]), 0).is_err(), "cut at {c} accepted");
    }

    #[test]
    fn forged_lengths_inside_a_valid_crc_frame_are_errors(field_len in any::<u16>(), body_len in any::<u32>()) {
        // A frame whose CRC is right but whose inner lengths lie: the decoder
        // must bounds-check, not trust them.
        let mut enc = valid();
        enc[64..66].copy_from_slice(&field_len.to_le_bytes()); // topic length
        let n = enc.len();
        enc[n - 4 - 20..n - 20].copy_from_slice(&body_len.to_le_bytes()); // body length
        let mut h = crc32fast::Hasher::new();
        h.update(&enc[0..4]);
        h.update(&enc[8..]);
        let crc = h.finalize();
        enc[4..8].copy_from_slice(&crc.to_le_bytes());
        let r = Record::decode(Bytes::from(enc), 0);
        if field_len != 4 || body_len != 20 {
            prop_assert!(r.is_err());
        }
    }
}

#[test]
fn a_forged_four_gigabyte_length_is_rejected_without_allocating() {
    let mut enc = valid();
    enc[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(check_frame(&enc, 0).is_err());
    assert!(Record::decode(Bytes::from(enc), 0).is_err());
}
