//! Shared helpers: deterministic documents and a verifier that recomputes expected
//! tensors from the stored source tokens.

use std::sync::Arc;

use starkv_cache::{
    BlockStore, DType, DocLease, DocRef, DocSpec, Engine, ManualClock, MemEngine, RocksConfig,
    RocksEngine, StoreConfig, Tensor,
};

pub const LAYERS: u16 = 4;
pub const KV_HEADS: u32 = 2;
pub const HEAD_DIM: u32 = 8;
pub const BLOCK: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mem,
    Rocks,
}

pub const KINDS: [Kind; 2] = [Kind::Mem, Kind::Rocks];

pub struct Env {
    pub store: BlockStore,
    pub clock: Arc<ManualClock>,
    pub dir: Option<tempfile::TempDir>,
}

pub fn test_config() -> StoreConfig {
    StoreConfig {
        hot_tier_bytes: 0,
        encode_threads: 1,
        ..StoreConfig::default()
    }
}

pub fn rocks_config(path: &std::path::Path) -> RocksConfig {
    RocksConfig {
        min_blob_size: 512,
        write_buffer_bytes: 4 << 20,
        background_jobs: 1,
        ..RocksConfig::new(path, 3)
    }
}

pub fn env(kind: Kind, cfg: StoreConfig) -> Env {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let (engine, dir): (Box<dyn Engine>, _) = match kind {
        Kind::Mem => (Box::new(MemEngine::new(3)), None),
        Kind::Rocks => {
            let dir = tempfile::tempdir().unwrap();
            (
                Box::new(RocksEngine::open(rocks_config(dir.path())).unwrap()),
                Some(dir),
            )
        }
    };
    let store = BlockStore::open(engine, cfg, clock.clone()).unwrap();
    Env { store, clock, dir }
}

/// Smooth, deterministic values for one layer of a block whose first token is `seed`.
pub fn layer_values(seed: u32, layer: u16, tokens: u32) -> Vec<f32> {
    let n = (2 * KV_HEADS * tokens * HEAD_DIM) as usize;
    (0..n)
        .map(|i| {
            let x = seed as f32 * 0.013 + i as f32 * 0.07 + layer as f32 * 0.5;
            x.sin() * 2.0 + (i % 7) as f32 * 0.01
        })
        .collect()
}

pub fn layers_for(seed: u32, tokens: u32, dtype: DType) -> Vec<Tensor> {
    (0..LAYERS)
        .map(|l| {
            Tensor::from_f32(
                dtype,
                vec![2, KV_HEADS, tokens, HEAD_DIM],
                &layer_values(seed, l, tokens),
            )
            .unwrap()
        })
        .collect()
}

/// Token ids of a document: blocks of BLOCK tokens; block `i` starts with
/// `base + i * 1000` so documents with the same `base` share blocks position-wise.
pub fn doc_tokens(base: u32, blocks: u32) -> Vec<u32> {
    (0..blocks * BLOCK)
        .map(|t| base + (t / BLOCK) * 1000 + t % BLOCK)
        .collect()
}

pub fn spec(doc: &str, tenant: &str, dtype: DType, tokens: Vec<u32>) -> DocSpec {
    DocSpec {
        model_fingerprint: b"test-model".to_vec(),
        tokenizer_fingerprint: b"test-tok".to_vec(),
        dtype,
        block_size: BLOCK,
        anchor_size: BLOCK,
        source_tokens: tokens,
        ..DocSpec::new(doc, tenant)
    }
}

/// Ingests and commits a document built from `base`.
pub fn ingest_spec(store: &BlockStore, spec: DocSpec) -> starkv_cache::Result<DocRef> {
    let tokens = spec.source_tokens.clone();
    let dtype = spec.dtype;
    let mut ing = store.begin_ingest(spec)?;
    let anchor: Vec<u32> = tokens[..BLOCK as usize].to_vec();
    for (i, chunk) in tokens.chunks(BLOCK as usize).enumerate() {
        let start = (i as u32 * BLOCK) as u64;
        let key = ing.block_key(&anchor, chunk, start);
        if !ing.reuse_block(key, start, chunk.len() as u32) {
            ing.put_block(
                key,
                start,
                chunk.len() as u32,
                &layers_for(chunk[0], chunk.len() as u32, dtype),
            )?;
        }
    }
    ing.commit()
}

pub fn ingest(store: &BlockStore, doc: &str, tenant: &str, base: u32, blocks: u32) -> DocRef {
    ingest_spec(
        store,
        spec(doc, tenant, DType::F16, doc_tokens(base, blocks)),
    )
    .unwrap()
}

/// Reads every layer through the lease and compares with the recomputed tensors.
pub fn verify_lease(lease: &DocLease) -> starkv_cache::Result<()> {
    let tokens = lease.source_tokens()?;
    let m = lease.manifest();
    assert_eq!(tokens.len() as u64, m.source_tokens);
    for (i, b) in m.blocks.iter().enumerate() {
        let first = tokens[b.start as usize];
        let expect = layers_for(first, b.tokens, m.dtype);
        assert_eq!(b.layers as usize, expect.len());
        for (l, e) in expect.iter().enumerate() {
            let got = lease.read_layer(i, l as u16)?;
            assert_eq!(&*got, e, "{} block {i} layer {l}", m.doc);
        }
    }
    Ok(())
}

pub fn verify_doc(store: &BlockStore, doc: &DocRef) {
    let lease = store.open_version(doc).unwrap();
    verify_lease(&lease).unwrap();
}
