//! Bulk reads into caller-provided buffers: the cold path of a query on a GPU host reads
//! whole blocks (GBs) straight into page-locked staging, several layers at once, so a
//! block costs one pass over its bytes after the engine hands them out (verify, then
//! decompress/un-shuffle or copy into the destination), no [`Tensor`] allocation, no
//! f32 copy, no hot-tier insert.
//!
//! Same guarantees as [`DocLease::read_layer`]: every value is verified before any of it
//! reaches the caller's buffer; a failure is [`Error::Corrupt`] / [`Error::MissingBlock`],
//! counted and marked for repair. On an error the destination holds partial data and
//! must not be used.

use std::sync::{Mutex, OnceLock};

use super::{DocLease, Inner, bump};
use crate::codec;
use crate::engine::{Space, Target, layer_key};
use crate::error::{CodecError, Error, Result};
use crate::key::BlockKey;
use crate::metrics as m;
use crate::tensor::DType;

impl DocLease {
    /// Every layer of block `block` as elements of `want`, layer after layer, into `dst`
    /// (`layers x layer_bytes` bytes, every layer exactly `layer_bytes`). Up to `threads`
    /// layers are read, verified and decoded at once (each on its own thread); the hot
    /// tier is used when it holds a layer and is not filled.
    pub fn read_block_into(
        &self,
        block: usize,
        want: DType,
        layer_bytes: usize,
        dst: &mut [u8],
        threads: usize,
    ) -> Result<()> {
        let b = self.block(block, 0)?;
        let (key, layers) = (b.key, b.layers as usize);
        if layer_bytes == 0 || dst.len() != layers * layer_bytes {
            return Err(Error::InvalidArgument(format!(
                "block {block}: {layers} layers of {layer_bytes} bytes do not fill {} bytes",
                dst.len()
            )));
        }
        let work: Vec<(u16, &mut [u8])> = dst
            .chunks_mut(layer_bytes)
            .enumerate()
            .map(|(l, d)| (l as u16, d))
            .collect();
        let threads = threads.clamp(1, layers);
        if threads == 1 {
            return work
                .into_iter()
                .try_for_each(|(l, d)| self.inner.read_layer_into(&key, l, want, d));
        }
        let queue = Mutex::new(work.into_iter());
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        readers().scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| {
                    loop {
                        if failed.lock().map_or(true, |f| f.is_some()) {
                            return;
                        }
                        let Some((l, d)) = queue.lock().ok().and_then(|mut q| q.next()) else {
                            return;
                        };
                        if let Err(e) = self.inner.read_layer_into(&key, l, want, d) {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                });
            }
        });
        match failed.into_inner() {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err(Error::InvalidArgument("a read worker panicked".into())),
        }
    }
}

/// The threads of bulk reads: long-lived, so each keeps its decode scratch (the codec's
/// thread-local buffer, a decoded layer's size) from block to block instead of faulting
/// in a new one for every block, as threads spawned per call did. As many as the host
/// has hardware threads; a call asking for more runs the extra workers' share on them.
fn readers() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(4, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("starkv-read-{i}"))
            .build()
            .expect("spawning the store's reader threads")
    })
}

/// Why a value could not be decoded into the caller's buffer.
enum Failure {
    Corrupt(CodecError),
    /// The value decodes to this many bytes, not the buffer's size.
    Size(usize),
}

impl Inner {
    /// One verified layer decoded into `dst` (hot tier first, then the engine).
    fn read_layer_into(
        &self,
        key: &BlockKey,
        layer: u16,
        want: DType,
        dst: &mut [u8],
    ) -> Result<()> {
        let dst_len = dst.len();
        let size_error = |n: usize| {
            Error::InvalidArgument(format!(
                "block {key} layer {layer} decodes to {n} bytes of {}, the buffer holds {dst_len}",
                want.name(),
            ))
        };
        if let Some(t) = self.hot.get(key, layer) {
            let n = if t.dtype() == want {
                t.byte_len()
            } else {
                t.numel() * want.size()
            };
            if n != dst.len() || (want.is_quantized() && t.dtype() != want) {
                return Err(size_error(n));
            }
            if t.dtype() == want {
                dst.copy_from_slice(t.as_bytes());
            } else if t.dtype().is_quantized() {
                codec::dequantize_into(t.dtype(), t.shape(), t.as_bytes(), want, dst);
            } else {
                codec::convert_elements(t.dtype(), t.as_bytes(), want, dst);
            }
            bump(
                &self.ctr.decoded_bytes_read,
                m::DECODED_BYTES_READ,
                n as u64,
            );
            return Ok(());
        }
        let shard = key.shard(self.engine.shards());
        // Verification failures are handled after the engine let go of the value.
        let mut outcome: Option<std::result::Result<usize, Failure>> = None;
        self.engine.get(
            Target::Shard(shard),
            Space::Layers,
            &layer_key(key, layer),
            &mut |v| {
                let Some(v) = v else { return };
                outcome = Some(match codec::verify(v) {
                    Err(reason) => Err(Failure::Corrupt(reason)),
                    Ok((info, payload)) => {
                        let n = codec::decoded_len(&info, want);
                        if n != dst_len {
                            Err(Failure::Size(n))
                        } else {
                            codec::decode_payload_into(&info, payload, want, dst)
                                .map(|()| v.len())
                                .map_err(Failure::Corrupt)
                        }
                    }
                });
            },
        )?;
        match outcome {
            Some(Ok(stored)) => {
                bump(&self.ctr.bytes_read, m::BYTES_READ, stored as u64);
                bump(&self.ctr.layers_read, m::LAYERS_READ, 1);
                bump(
                    &self.ctr.decoded_bytes_read,
                    m::DECODED_BYTES_READ,
                    dst_len as u64,
                );
                Ok(())
            }
            Some(Err(Failure::Size(n))) => Err(size_error(n)),
            Some(Err(Failure::Corrupt(reason))) => Err(self.corrupt(key, layer, shard, reason)),
            None => {
                bump(&self.ctr.checksum_failures, m::CHECKSUM_FAILURES, 1);
                tracing::error!(block = %key, layer, shard, "block missing under a visible manifest");
                self.mark_repair(key);
                Err(Error::MissingBlock {
                    block: *key,
                    layer,
                    shard,
                })
            }
        }
    }

    /// Counts a value that failed verification, marks its block for repair, and says so.
    fn corrupt(&self, key: &BlockKey, layer: u16, shard: usize, reason: CodecError) -> Error {
        bump(&self.ctr.checksum_failures, m::CHECKSUM_FAILURES, 1);
        tracing::error!(block = %key, layer, shard, %reason, "stored value failed verification");
        self.mark_repair(key);
        Error::Corrupt {
            block: *key,
            layer,
            shard,
            reason,
        }
    }
}
