//! Byte-level GGUF parsing with caps on every length read from the file.

use std::collections::BTreeMap;

use super::TensorInfo;
use crate::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Longest string accepted (keys, values, tensor names): the largest real-world value is
/// a chat template of a few KiB; 16 MiB leaves ample room.
const MAX_STRING_LEN: u64 = 16 << 20;
/// Most array elements accepted (vocabularies run to a few hundred thousand entries).
const MAX_ARRAY_LEN: u64 = 16 << 20;
const MAX_TENSOR_DIMS: u32 = 4;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_METADATA: u64 = 1 << 20;
/// Arrays of arrays are legal in GGUF but never nested deeply in practice.
const MAX_DEPTH: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

pub(super) struct Parsed {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type Res<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("truncated at byte {} (wanted {n} more)", self.pos));
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Res<String> {
        let len = self.u64()?;
        if len > MAX_STRING_LEN {
            return Err(format!(
                "string of {len} bytes at byte {} exceeds the cap",
                self.pos
            ));
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format!("string at byte {} is not UTF-8", self.pos))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Res<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err("arrays nested too deeply".into());
                }
                let item_ty = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ARRAY_LEN {
                    return Err(format!("array of {len} elements exceeds the cap"));
                }
                // Each element takes at least one byte: a cheap bound before allocating.
                if len as usize > self.bytes.len() - self.pos {
                    return Err(format!("array of {len} elements cannot fit in the file"));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

pub(super) fn parse(bytes: &[u8]) -> Res<Parsed> {
    let mut cur = Cursor { bytes, pos: 0 };
    if cur.take(4)? != MAGIC {
        return Err("bad magic (expected `GGUF`)".into());
    }
    let version = cur.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let n_tensors = cur.u64()?;
    let n_metadata = cur.u64()?;
    if n_tensors > MAX_TENSORS || n_metadata > MAX_METADATA {
        return Err(format!(
            "implausible counts: {n_tensors} tensors, {n_metadata} metadata keys"
        ));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_metadata {
        let key = cur.string()?;
        let ty = cur.u32()?;
        let value = cur
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = cur.string()?;
        let n_dims = cur.u32()?;
        if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = cur.u64()?;
            dims.push(
                usize::try_from(d)
                    .map_err(|_| format!("tensor `{name}` dimension {d} too large"))?,
            );
        }
        let ty = cur.u32()?;
        let dtype = GgmlType::from_u32(ty)
            .ok_or_else(|| format!("tensor `{name}` has unsupported type id {ty}"))?;
        if dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(format!("tensor `{name}` element count overflows"));
        }
        if dims[0] % dtype.block_size() != 0 {
            return Err(format!(
                "tensor `{name}`: row length {} is not a multiple of the {dtype:?} block size",
                dims[0]
            ));
        }
        let offset = cur.u64()? as usize;
        tensors.push(TensorInfo {
            name,
            dims,
            dtype,
            offset,
        });
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a as usize,
            _ => return Err("general.alignment must be a power of two".into()),
        },
    };
    let data_offset = cur.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(format!(
                "tensor `{}` offset {} is not aligned to {alignment}",
                t.name, t.offset
            ));
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        data_offset,
    })
}
