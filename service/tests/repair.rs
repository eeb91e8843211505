//! A checksum failure found at query time triggers a repair (the block is re-encoded from
//! the stored source tokens) and the query still answers correctly.

use starkv_cache::engine::{Batch, Space, Target, layer_key};
use starkv_cache::{BlockStore, StoreConfig};
use starkv_compute::LoadedModel;
use starkv_compute::sampling::SamplingParams;
use starkv_service::{IngestRequest, QueryRequest, Service};

#[test]
fn a_corrupt_block_is_repaired_during_the_query_and_the_answer_is_unchanged() {
    let data = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("starkv-test-data");
    let model_path = starkv_compute::fetch::ensure_default_model(&data, &mut |m| eprintln!("{m}"))
        .expect("default model");
    let store = BlockStore::in_memory(3, StoreConfig::default()).unwrap();
    let service = Service::new(
        LoadedModel::open(&model_path).unwrap(),
        &model_path,
        store,
        0,
    )
    .unwrap();
    let text = "The lighthouse stands on the northern cape. Ships pass it every night.\n\n\
                The special magic number for the cape is 3318450. Remember it.\n\n\
                In summer the cliffs are covered with sea pinks and the puffins return.";
    let tokens = service.document_tokens(text).unwrap();
    let req = IngestRequest {
        id: "t/cape".into(),
        tenant: "t".into(),
        text: text.into(),
        block_size: 24,
        anchor_size: 24,
        // With a lead, so the repair must re-encode each block after it, as stored.
        block_overlap: 8,
        merge: Default::default(),
        reencode_ratio: 0.0,
        pinned: false,
        ttl_ms: None,
        kv_dtype: Default::default(),
    };
    let outcome = service.ingest(&req, tokens, &|_, _| {}).unwrap();
    assert!(outcome.blocks >= 3);
    let query = QueryRequest {
        question: "What is the special magic number for the cape?".into(),
        max_tokens: 28,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        cancel: Default::default(),
        merge: None,
        logprobs: None,
    };
    let before = service.query("t/cape", "t", &query, &mut |_| true).unwrap();
    assert!(before.answer.contains("3318450"), "{}", before.answer);
    assert_eq!(before.repaired_blocks, 0);

    // Flip one byte of layer 7 of block 1, then drop every in-memory copy.
    let lease = service.store().open_doc("t/cape").unwrap();
    assert_eq!(lease.manifest().block_overlap, 8, "the overlap is recorded");
    let block = lease.manifest().blocks[1].clone();
    drop(lease);
    let shard = block.key.shard(service.store().engine().shards());
    let key = layer_key(&block.key, 7);
    let mut value = None;
    service
        .store()
        .engine()
        .get(Target::Shard(shard), Space::Layers, &key, &mut |v| {
            value = v.map(<[u8]>::to_vec)
        })
        .unwrap();
    let mut value = value.expect("stored layer");
    let middle = value.len() / 2;
    value[middle] ^= 0x10;
    let mut batch = Batch::default();
    batch.put(Space::Layers, key, value);
    service
        .store()
        .engine()
        .write(Target::Shard(shard), batch, true)
        .unwrap();
    service.forget_ready_blocks();
    service.store().clear_hot_tier();

    let after = service.query("t/cape", "t", &query, &mut |_| true).unwrap();
    assert_eq!(after.repaired_blocks, 1, "the corrupt block was re-encoded");
    assert_eq!(after.answer, before.answer, "the answer is unaffected");
    assert!(
        service.store().repair_queue().is_empty(),
        "the repaired block left the repair queue"
    );
    assert!(service.store().stats().checksum_failures >= 1);
    // The repaired block verifies on the next read from the store.
    service.forget_ready_blocks();
    service.store().clear_hot_tier();
    let again = service.query("t/cape", "t", &query, &mut |_| true).unwrap();
    assert_eq!(again.repaired_blocks, 0);
}
