//! Model test: the commit log against a `Vec` of records, across segment
//! boundaries and reopens.

mod common;

use common::{open, rec};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Reopen,
    Read(usize),
    IterFrom(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec(0usize..1500, 1..6).prop_map(Op::Append),
        1 => Just(Op::Reopen),
        3 => any::<usize>().prop_map(Op::Read),
        1 => any::<usize>().prop_map(Op::IterFrom),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_vec_model(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        // Model: (physical offset, body, queue offset) in append order.
        let mut model: Vec<(u64, Vec<u8>, u64)> = Vec::new();
        let mut counter = 0usize;
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let bodies: Vec<Vec<u8>> = sizes
                        .iter()
                        .map(|&n| { counter += 1; vec![(counter % 251) as u8; n] })
                        .collect();
                    let recs = bodies.iter().map(|b| rec("m", 0, b)).collect();
                    let r = rt.block_on(store.append_durable(recs)).unwrap();
                    for (i, b) in bodies.into_iter().enumerate() {
                        let expected_qo = model.len() as u64;
                        prop_assert_eq!(r.queue_offsets[i], Some(expected_qo));
                        if let Some(prev) = model.last() {
                            prop_assert!(r.offsets[i] > prev.0);
                        }
                        model.push((r.offsets[i], b, expected_qo));
                    }
                }
                Op::Reopen => {
                    store.close().unwrap();
                    drop(store);
                    store = open(dir.path());
                }
                Op::Read(i) => {
                    if model.is_empty() { continue; }
                    let (off, body, qo) = &model[i % model.len()];
                    let r = store.log().read(*off).unwrap();
                    prop_assert_eq!(&r.body[..], &body[..]);
                    let m = store.read_queue("m", 0, *qo).unwrap();
                    prop_assert_eq!(m.physical_offset, *off);
                    prop_assert_eq!(&m.record.body[..], &body[..]);
                }
                Op::IterFrom(i) => {
                    if model.is_empty() { continue; }
                    let start = i % model.len();
                    let got: Vec<(u64, Vec<u8>)> = store
                        .log()
                        .iter_from(model[start].0)
                        .map(|r| r.map(|(o, rec)| (o, rec.body.to_vec())))
                        .collect::<Result<_, _>>()
                        .unwrap();
                    let want: Vec<(u64, Vec<u8>)> =
                        model[start..].iter().map(|(o, b, _)| (*o, b.clone())).collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
        // Segments: every file but the last is within the size limit, offsets contiguous.
        let segs = store.log().segments().unwrap();
        for w in segs.windows(2) {
            prop_assert_eq!(w[0].end, w[1].base);
            prop_assert!(w[0].end - w[0].base <= 4096);
        }
        prop_assert_eq!(store.max_queue_offset("m", 0), model.len() as u64);
    }
}
