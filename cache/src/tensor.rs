//! Typed tensors: the only kind of value the cache stores.
//!
//! The cache knows nothing about models; a block layer is just a dense little-endian
//! tensor with a dtype and a shape (for KV, conventionally `[2, kv_heads, tokens,
//! head_dim]`: K then V). The element buffer is typed (`Vec<f16>` etc.) rather than
//! `Vec<u8>` so that callers get aligned, zero-copy slices.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::error::{Error, Result};

#[cfg(target_endian = "big")]
compile_error!("starkv-cache stores little-endian tensors by reinterpreting memory");

/// Maximum tensor rank accepted (keeps headers small and bounded).
pub const MAX_RANK: usize = 8;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary16 (the default for KV: half the bytes, lossless for f16 models).
    F16 = 1,
    /// bfloat16.
    BF16 = 2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Stable one-byte code used in headers and content keys.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// Element storage of a [`Tensor`].
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

impl TensorData {
    /// Zeroed storage of `n` elements.
    pub fn zeros(dtype: DType, n: usize) -> Self {
        match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian element bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Mutable little-endian element bytes (used by the decoder to fill in place).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice_mut(v),
            TensorData::F16(v) => bytemuck::cast_slice_mut(v),
            TensorData::BF16(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// A dense tensor with a shape. Invariant: product of `shape` equals the element count.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<u32>,
    data: TensorData,
}

fn numel(shape: &[u32]) -> Result<usize> {
    if shape.len() > MAX_RANK {
        return Err(Error::InvalidArgument(format!(
            "rank {} exceeds {MAX_RANK}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| Error::InvalidArgument("shape overflows usize".into()))
}

impl Tensor {
    /// Wraps existing storage; fails if the shape does not match the element count.
    pub fn new(shape: Vec<u32>, data: TensorData) -> Result<Self> {
        let n = numel(&shape)?;
        if n != data.len() {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} has {n} elements, data has {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    /// Converts f32 values (row-major for `shape`) to `dtype`. f16 conversion uses the
    /// CPU's F16C instructions when present (round to nearest even).
    pub fn from_f32(dtype: DType, shape: Vec<u32>, values: &[f32]) -> Result<Self> {
        Self::from_f32_parts(dtype, shape, &[values])
    }

    /// Like [`Tensor::from_f32`] with the values given as consecutive parts (e.g. the K
    /// and V buffers of one layer), avoiding a concatenation copy.
    pub fn from_f32_parts(dtype: DType, shape: Vec<u32>, parts: &[&[f32]]) -> Result<Self> {
        let n = numel(&shape)?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total != n {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} has {n} elements, parts have {total}"
            )));
        }
        let mut data = TensorData::zeros(dtype, n);
        let mut off = 0;
        for p in parts {
            let r = off..off + p.len();
            match &mut data {
                TensorData::F32(v) => v[r].copy_from_slice(p),
                TensorData::F16(v) => v[r].convert_from_f32_slice(p),
                TensorData::BF16(v) => v[r].convert_from_f32_slice(p),
            }
            off += p.len();
        }
        Ok(Tensor { shape, data })
    }

    /// Convenience for one KV layer: K and V, each `[kv_heads][tokens][head_dim]`, stored
    /// as one tensor of shape `[2, kv_heads, tokens, head_dim]`.
    pub fn kv_layer(
        dtype: DType,
        kv_heads: u32,
        tokens: u32,
        head_dim: u32,
        k: &[f32],
        v: &[f32],
    ) -> Result<Self> {
        Self::from_f32_parts(dtype, vec![2, kv_heads, tokens, head_dim], &[k, v])
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Shape (row-major).
    pub fn shape(&self) -> &[u32] {
        &self.shape
    }

    /// Element storage.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Size of the element bytes (what "decoded bytes" means in metrics).
    pub fn byte_len(&self) -> usize {
        self.data.len() * self.dtype().size()
    }

    /// Little-endian element bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.as_bytes()
    }

    /// Widens every element to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => {
                let mut out = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut out);
                out
            }
            TensorData::BF16(v) => {
                let mut out = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut out);
                out
            }
        }
    }

    /// The f16 elements, if this is an f16 tensor.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            TensorData::F16(v) => Some(v),
            _ => None,
        }
    }

    /// Consumes the tensor and returns shape and storage.
    pub fn into_parts(self) -> (Vec<u32>, TensorData) {
        (self.shape, self.data)
    }
}
