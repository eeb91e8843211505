//! `DocLease::read_block_into`: the bulk read of the GPU cold path.

use starkv_cache::engine::{Batch, Space, Target, layer_key};
use starkv_cache::{DType, Error, Tensor};

use crate::util::*;

/// The expected bytes of block `i` as `want`: every layer, converted from the stored
/// tensors, one after another.
fn expected(lease: &starkv_cache::DocLease, i: usize, want: DType) -> (usize, Vec<u8>) {
    let m = lease.manifest();
    let b = &m.blocks[i];
    let tokens = lease.source_tokens().unwrap();
    let layers = layers_for(tokens[b.start as usize], b.tokens, m.dtype);
    let mut out = Vec::new();
    for t in &layers {
        let converted = Tensor::from_f32(want, t.shape().to_vec(), &t.to_f32()).unwrap();
        out.extend_from_slice(converted.as_bytes());
    }
    (out.len() / layers.len(), out)
}

#[test]
fn reads_every_block_in_every_type_on_one_or_several_threads() {
    for kind in KINDS {
        for stored in [DType::F16, DType::BF16] {
            let e = env(kind, test_config());
            let r = ingest_spec(&e.store, spec("a", "t", stored, doc_tokens(0, 3))).unwrap();
            let lease = e.store.open_version(&r).unwrap();
            for i in 0..lease.num_blocks() {
                for want in [DType::F16, DType::BF16, DType::F32] {
                    let (layer_bytes, expect) = expected(&lease, i, want);
                    for threads in [1, 3] {
                        let mut dst = vec![0xA5u8; expect.len()];
                        lease
                            .read_block_into(i, want, layer_bytes, &mut dst, threads)
                            .unwrap();
                        assert!(
                            dst == expect,
                            "{kind:?} {stored:?} -> {want:?} block {i} threads {threads}"
                        );
                    }
                }
            }
            assert_eq!(e.store.stats().checksum_failures, 0);
        }
    }
}

#[test]
fn a_wrong_buffer_size_is_invalid_not_corrupt() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "a", "t", 0, 1);
        let lease = e.store.open_version(&r).unwrap();
        let (layer_bytes, expect) = expected(&lease, 0, DType::F16);
        let mut short = vec![0u8; expect.len() - LAYERS as usize * 2];
        let err = lease
            .read_block_into(0, DType::F16, layer_bytes - 2, &mut short, 2)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        let mut odd = vec![0u8; expect.len() + 1];
        assert!(matches!(
            lease.read_block_into(0, DType::F16, layer_bytes, &mut odd, 2),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            lease.read_block_into(5, DType::F16, layer_bytes, &mut odd, 2),
            Err(Error::OutOfRange { .. })
        ));
        assert_eq!(e.store.stats().checksum_failures, 0);
        assert!(e.store.repair_queue().is_empty());
    }
}

#[test]
fn a_corrupt_or_missing_layer_fails_the_read_and_marks_the_block() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "a", "t", 0, 2);
        let lease = e.store.open_version(&r).unwrap();
        let block = lease.manifest().blocks[1].clone();
        let shard = block.key.shard(3);
        let (layer_bytes, expect) = expected(&lease, 1, DType::BF16);
        // Flip one byte of layer 2's stored value.
        let lk = layer_key(&block.key, 2);
        let mut value = None;
        e.store
            .engine()
            .get(Target::Shard(shard), Space::Layers, &lk, &mut |v| {
                value = v.map(<[u8]>::to_vec)
            })
            .unwrap();
        let mut bad = value.unwrap();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        let mut b = Batch::default();
        b.put(Space::Layers, lk.clone(), bad);
        e.store
            .engine()
            .write(Target::Shard(shard), b, false)
            .unwrap();
        let mut dst = vec![0u8; expect.len()];
        match lease.read_block_into(1, DType::BF16, layer_bytes, &mut dst, 4) {
            Err(Error::Corrupt {
                block: k, layer, ..
            }) => assert_eq!((k, layer), (block.key, 2)),
            other => panic!("{kind:?}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(e.store.repair_queue()[0].block, block.key);
        // A deleted layer: MissingBlock.
        let mut b = Batch::default();
        b.delete(Space::Layers, layer_key(&block.key, 0));
        e.store
            .engine()
            .write(Target::Shard(shard), b, false)
            .unwrap();
        assert!(matches!(
            lease.read_block_into(1, DType::BF16, layer_bytes, &mut dst, 1),
            Err(Error::MissingBlock { .. } | Error::Corrupt { .. })
        ));
        // Block 0 is untouched and still reads.
        let (lb0, expect0) = expected(&lease, 0, DType::BF16);
        let mut dst0 = vec![0u8; expect0.len()];
        lease
            .read_block_into(0, DType::BF16, lb0, &mut dst0, 4)
            .unwrap();
        assert!(dst0 == expect0);
    }
}

/// `DocLease::read_block_on` (the CPU cold path): on several threads, the same tensors
/// as one thread, layer order kept; a corrupt layer fails the read as `Corrupt` naming
/// that layer, and marks the block for repair.
#[test]
fn reading_a_block_on_several_threads_equals_one_thread_and_reports_corruption() {
    for kind in KINDS {
        let e = env(kind, test_config());
        let r = ingest(&e.store, "a", "t", 0, 2);
        let lease = e.store.open_version(&r).unwrap();
        for i in 0..lease.num_blocks() {
            let one = lease.read_block_on(i, 1).unwrap();
            for threads in [2, 3, 64] {
                e.store.clear_hot_tier();
                let many = lease.read_block_on(i, threads).unwrap();
                assert_eq!(one.len(), many.len());
                for (a, b) in one.iter().zip(&many) {
                    assert!(a.as_bytes() == b.as_bytes() && a.shape() == b.shape());
                }
            }
        }
        let block = lease.manifest().blocks[1].clone();
        let shard = block.key.shard(3);
        let lk = layer_key(&block.key, 2);
        let mut value = None;
        e.store
            .engine()
            .get(Target::Shard(shard), Space::Layers, &lk, &mut |v| {
                value = v.map(<[u8]>::to_vec)
            })
            .unwrap();
        let mut bad = value.unwrap();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        let mut b = Batch::default();
        b.put(Space::Layers, lk, bad);
        e.store
            .engine()
            .write(Target::Shard(shard), b, false)
            .unwrap();
        e.store.clear_hot_tier();
        match lease.read_block_on(1, 4) {
            Err(Error::Corrupt {
                block: k, layer, ..
            }) => assert_eq!((k, layer), (block.key, 2)),
            other => panic!(
                "{kind:?}: expected Corrupt, got {:?}",
                other.map(|t| t.len())
            ),
        }
        assert_eq!(e.store.repair_queue()[0].block, block.key);
    }
}
