//! The glue between compute's KV blocks ([`BlockKv`], f32 or 8-bit, head-major) and the
//! store's tensors (one per layer, `[2, kv_heads, tokens, head_dim]` in f16, bf16, or
//! int8 or fp8 e4m3 with one scale per row: per token and KV head), and the cache of decoded,
//! compute-ready blocks (an 8-bit document's blocks stay in 8 bits there).

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use starkv_cache::{BlockKey, DType, Tensor};
use starkv_compute::kv8::{Kv8, Kv8Format};
use starkv_compute::partial::HeadShape;
use starkv_compute::star::BlockKv;

use crate::{ServiceError, ServiceResult};

/// Layout of stored KV: per layer one tensor `[2 (K, V), kv_heads, tokens, head_dim]`,
/// K rotated at global positions. Part of every block key: changing it re-encodes.
pub const KV_LAYOUT_VERSION: u32 = 1;

/// One tensor per layer: `[2, kv_heads, tokens, head_dim]`, K then V, stored as `dtype`.
pub(crate) fn to_tensors(block: &BlockKv, dtype: DType) -> ServiceResult<Vec<Tensor>> {
    let s = block.shape;
    // Layers in parallel: quantising to 8 bits (a scale per token and head) one layer
    // after another made an int8 ingest ~1.6x a bf16 one on the H200 host.
    block
        .layers
        .par_iter()
        .map(|(k, v)| {
            Tensor::kv_layer(
                dtype,
                s.n_kv_heads as u32,
                block.len as u32,
                s.head_dim as u32,
                k,
                v,
            )
            .map_err(|e| ServiceError::Internal(e.to_string()))
        })
        .collect()
}

/// A stored block as compute reads it: 8-bit layers stay in 8 bits; f16 layers stay in
/// f16 when `keep_f16` (a CPU host: half the memory of f32 and no conversion at load; the
/// attention kernel widens one key tile at a time), else they and bf16 layers are widened
/// to f32 (a GPU host uploads them in its own type).
pub(crate) fn from_tensors(
    layers: &[Arc<Tensor>],
    start: usize,
    shape: HeadShape,
    keep_f16: bool,
) -> ServiceResult<BlockKv> {
    let first = layers
        .first()
        .ok_or_else(|| ServiceError::Internal("a stored block has no layers".into()))?;
    let dims = first.shape();
    if dims.len() != 4
        || dims[0] != 2
        || dims[1] as usize != shape.n_kv_heads
        || dims[3] as usize != shape.head_dim
    {
        return Err(ServiceError::Conflict(format!(
            "stored KV shape {dims:?} does not fit the model"
        )));
    }
    let len = dims[2] as usize;
    if first.dtype().is_quantized() {
        return from_8bit_tensors(layers, start, len, shape);
    }
    if keep_f16 && layers.iter().all(|t| t.as_f16().is_some()) {
        // Copied out of the tensors on every thread (a block is ~50 MB at 2K tokens).
        let kv16 = layers
            .par_iter()
            .map(|t| {
                let values = t.as_f16().unwrap_or_default();
                if t.shape() != dims {
                    return Err(ServiceError::Conflict(format!(
                        "stored KV layers of shapes {dims:?} and {:?} in one block",
                        t.shape()
                    )));
                }
                let (k, v) = values.split_at(values.len() / 2);
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect::<ServiceResult<Vec<_>>>()?;
        return Ok(BlockKv::half(start, len, shape, kv16));
    }
    let mut block = BlockKv::new(start, len, shape, layers.len());
    for (l, t) in layers.iter().enumerate() {
        let mut values = t.to_f32();
        let v = values.split_off(values.len() / 2);
        block.layers[l] = (values, v);
    }
    Ok(block)
}

/// The stored type of 8-bit blocks of `format`.
pub(crate) fn kv8_dtype(format: Kv8Format) -> DType {
    match format {
        Kv8Format::Int8 => DType::I8,
        Kv8Format::Fp8 => DType::F8,
    }
}

/// The 8-bit format of blocks stored as `dtype` (`None`: 16 or 32 bits).
pub(crate) fn kv8_format(dtype: DType) -> Option<Kv8Format> {
    match dtype {
        DType::I8 => Some(Kv8Format::Int8),
        DType::F8 => Some(Kv8Format::Fp8),
        _ => None,
    }
}

/// An 8-bit block (int8 or fp8): the stored elements and per-row scales, kept in 8 bits.
fn from_8bit_tensors(
    layers: &[Arc<Tensor>],
    start: usize,
    len: usize,
    shape: HeadShape,
) -> ServiceResult<BlockKv> {
    let half = shape.n_kv_heads * len;
    let dtype = layers[0].dtype();
    let format = kv8_format(dtype).unwrap_or(Kv8Format::Int8);
    let kv8 = layers
        .iter()
        .map(|t| {
            let (scales, q) = t.as_8bit().filter(|_| t.dtype() == dtype).ok_or_else(|| {
                ServiceError::Conflict("a block mixes layers of different types".into())
            })?;
            let q: &[i8] = bytemuck::cast_slice(q);
            if t.shape() != layers[0].shape() || scales.len() != 2 * half {
                return Err(ServiceError::Conflict(format!(
                    "stored 8-bit KV shape {:?} does not fit the model",
                    t.shape()
                )));
            }
            let (qk, qv) = q.split_at(q.len() / 2);
            let part = |q: &[i8], s: &[f32]| Kv8 {
                q: q.to_vec(),
                scales: s.to_vec(),
                rows_per_scale: 1,
                format,
            };
            Ok((part(qk, &scales[..half]), part(qv, &scales[half..])))
        })
        .collect::<ServiceResult<Vec<_>>>()?;
    Ok(BlockKv::quantized(start, len, shape, kv8))
}

/// A byte-bounded LRU of compute-ready blocks.
pub(crate) struct ReadyBlocks {
    budget: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<BlockKey, (Arc<BlockKv>, u64)>,
}

impl ReadyBlocks {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &BlockKey) -> Option<Arc<BlockKv>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(b, t)| {
            *t = tick;
            b.clone()
        })
    }

    pub(crate) fn insert(&mut self, key: BlockKey, block: Arc<BlockKv>) {
        let size = block.n_bytes();
        if size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, (_, t))| *t) else {
                break;
            };
            if let Some((b, _)) = self.entries.remove(&oldest) {
                self.bytes -= b.n_bytes();
            }
        }
        self.tick += 1;
        self.bytes += size;
        if let Some((old, _)) = self.entries.insert(key, (block, self.tick)) {
            self.bytes -= old.n_bytes();
        }
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An int8 document's block goes through the store's quantiser (`Tensor::kv_layer`)
    /// and comes back as compute's 8-bit block, bit for bit what compute's own quantiser
    /// gives (the benches quantise with the latter), and within half a step of the f32
    /// values.
    #[test]
    fn int8_blocks_round_trip_through_store_tensors() {
        let shape = HeadShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let len = 11;
        let mut block = BlockKv::new(40, len, shape, 3);
        let mut x = 0.3f32;
        for l in 0..3 {
            let mut next = |n: usize| {
                (0..n)
                    .map(|_| {
                        x = (x * 3.7 + 0.11).fract();
                        (x - 0.5) * (l + 1) as f32 * 5.0
                    })
                    .collect::<Vec<f32>>()
            };
            let n = shape.n_kv_heads * len * shape.head_dim;
            block.layers[l] = (next(n), next(n));
        }
        let tensors = to_tensors(&block, DType::I8).unwrap();
        assert_eq!(tensors[0].dtype(), DType::I8);
        let layers: Vec<Arc<Tensor>> = tensors.into_iter().map(Arc::new).collect();
        let back = from_tensors(&layers, 40, shape, false).unwrap();
        assert!(back.is_8bit());
        assert_eq!((back.start, back.len), (40, len));
        for ((k, v), (k8, v8)) in block.layers.iter().zip(back.kv8.as_ref().unwrap()) {
            assert_eq!(k8, &Kv8::quantize(k, shape.head_dim, 1));
            assert_eq!(v8, &Kv8::quantize(v, shape.head_dim, 1));
            for (a, b) in k.iter().zip(k8.dequantize(shape.head_dim)) {
                let step = k.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                assert!((a - b).abs() <= step, "{a} {b}");
            }
        }
        // A block mixing 8-bit and 16-bit layers is refused, not misread.
        let mut mixed = layers.clone();
        mixed[1] = Arc::new(to_tensors(&block, DType::F16).unwrap().remove(1));
        assert!(from_tensors(&mixed, 40, shape, false).is_err());

        // fp8: the store's quantiser and compute's give the same codes and scales; a
        // block mixing int8 and fp8 layers is refused too.
        let f8: Vec<Arc<Tensor>> = to_tensors(&block, DType::F8)
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect();
        assert_eq!(f8[0].dtype(), DType::F8);
        let back8 = from_tensors(&f8, 40, shape, false).unwrap();
        for ((k, v), (k8, v8)) in block.layers.iter().zip(back8.kv8.as_ref().unwrap()) {
            let d = shape.head_dim;
            assert_eq!(k8, &Kv8::quantize_as(Kv8Format::Fp8, k, d, 1));
            assert_eq!(v8, &Kv8::quantize_as(Kv8Format::Fp8, v, d, 1));
        }
        let mut mixed = f8.clone();
        mixed[2] = layers[2].clone();
        assert!(from_tensors(&mixed, 40, shape, false).is_err());

        // f16 layers kept in f16 (a CPU host) widen to exactly what the f32 load gives.
        let f16_layers: Vec<Arc<Tensor>> = to_tensors(&block, DType::F16)
            .unwrap()
            .into_iter()
            .map(Arc::new)
            .collect();
        let kept = from_tensors(&f16_layers, 40, shape, true).unwrap();
        let widened = from_tensors(&f16_layers, 40, shape, false).unwrap();
        assert!(kept.kv16.is_some() && widened.kv16.is_none());
        assert_eq!(kept.n_bytes() * 2, widened.n_bytes(), "half the bytes");
        assert_eq!(Arc::new(kept).dequantized().layers, widened.layers);
    }
}
