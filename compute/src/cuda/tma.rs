//! Tensor maps for the Hopper attention kernels' bulk tensor copies (`*_tma` in
//! attention_sm90.cu): per plan item, maps for its K rows and its V rows in boxes of
//! each tile size the kernels use (128 and 176 keys), so that one producer thread loads a
//! tile with four copies and the copy engine writes the 128-byte swizzle wgmma reads. Encoded on the host (`cuTensorMapEncodeTiled`,
//! no GPU work) and uploaded with the plan; only plans of long query runs get them (a
//! decode plan's hundreds of items would cost more to encode than its attention takes).

use cudarc::driver::sys;

use super::attention::AttnItem;
use super::{CudaError, Result};

/// Bytes per item in the uploaded map table (mirrors `ITEM_MAP_BYTES` in
/// attention_sm90.cu): per entry of [`BOX_KEYS`] the K map, then the V map (128 bytes
/// each, the alignment CUDA 13 gives `CUtensorMap`).
pub(super) const ITEM_MAP_BYTES: usize = 512;

/// The keys per box of each pair of maps, in table order: the Hopper kernels' tile sizes
/// ([`super::attention::LongKernel::hopper_keys`]).
pub(super) const BOX_KEYS: [u32; 2] = [128, 176];

/// The head dimension the maps describe (the Hopper kernels' only one).
const HEAD_DIM: u64 = 128;

/// The maps of every item ([`ITEM_MAP_BYTES`] per item: for each of [`BOX_KEYS`], K then
/// V), for items of 16-bit rows of [`HEAD_DIM`] values over `n_kv` KV heads. A map covers
/// keys `0..key_end` of its segment (rows past the end load as zeros; the kernel masks
/// past `key_end` anyway) as a 3-d tensor (dims, keys, heads) read in boxes of 64 dims x
/// (128 or 176) keys x 1 head.
pub(super) fn item_maps(items: &[AttnItem], n_kv: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(items.len() * ITEM_MAP_BYTES);
    for it in items {
        if it.scale_off != 0 || it.row_stride < HEAD_DIM as i32 {
            return Err(CudaError::Invalid(
                "tensor maps need 16-bit rows of 128 values".into(),
            ));
        }
        for keys in BOX_KEYS {
            for base in [it.k, it.v] {
                let map = encode(base, it, n_kv, keys)?;
                for word in map.opaque {
                    out.extend_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
    Ok(out)
}

fn encode(base: u64, it: &AttnItem, n_kv: usize, keys: u32) -> Result<sys::CUtensorMap> {
    let dims: [u64; 3] = [HEAD_DIM, it.key_end.max(1) as u64, n_kv.max(1) as u64];
    let strides: [u64; 2] = [it.row_stride as u64 * 2, it.head_stride as u64 * 2];
    let boxes: [u32; 3] = [64, keys, 1];
    let element_strides: [u32; 3] = [1, 1, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer is to a live local array of the rank the call is given; the
    // call only writes `map`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            3,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Invalid(format!(
            "cuTensorMapEncodeTiled: {r:?} (dims {dims:?}, strides {strides:?})"
        )));
    }
    Ok(map)
}
