//! Attention on the GPU: the key table (segments cut into items and splits), the choice
//! of kernel and split count, the launch with its log-sum-exp merge, and
//! [`SegmentAttention`], the one path every attention implementation (phase 1, phase 2,
//! the plain KV cache, shards) plans and launches through.

use cudarc::driver::LaunchConfig;

use super::device::{DevBuf, Gpu, TableBuf};
use super::kernels::Kernels;
use super::launch::{Dependent, arg};
use super::{CudaError, Result};
use crate::partial::HeadShape;

/// The attention kernels launched as programmatic dependents (they call `pdl_wait()`
/// first: `attn_simple_body`, `attn_pipe_body`; `attn_merge` always is); any other kernel
/// a plan picks is launched plainly. Checked against `attention.cu` by a test.
pub(super) const WAIT_FOR_PREDECESSOR: &[&str] = &[
    "attn_fwd_simple",
    "attn_fwd_w1",
    "attn_fwd_w1_qsmem",
    "attn_fwd_simple_kv8",
    "attn_fwd_w1_kv8",
    "attn_fwd_simple_kv8_n64",
    "attn_fwd_w1_kv8_n64",
    "attn_fwd_swap",
    "attn_fwd_m32",
    "attn_fwd_m32n32",
    "attn_fwd_p1n32",
    "attn_fwd_w1_fm",
    "attn_fwd_w1_kv8_fm",
    "attn_fwd_w1_kv8_n64_fm",
];

/// The decode kernels with the fused split merge
/// ([`SplitTuning::fused_merge`](super::SplitTuning::fused_merge)): `(kernel, its fused
/// twin)`. The others (`attn_fwd_w1_qsmem`, `attn_fwd_p1n32`, the 4-warp kernels) keep
/// the separate `attn_merge` launch.
const FUSED_MERGE: &[(&str, &str)] = &[
    ("attn_fwd_w1", "attn_fwd_w1_fm"),
    ("attn_fwd_w1_kv8", "attn_fwd_w1_kv8_fm"),
    ("attn_fwd_w1_kv8_n64", "attn_fwd_w1_kv8_n64_fm"),
];

/// u32 counters of the fused merge per (row block, KV head) (`FM_COUNTERS` in
/// attention.cu).
const FM_COUNTERS: usize = 64;

/// Head-dim-dependent dynamic shared memory of the pipelined kernels (see attention.cu):
/// `tiles` rows of `head_dim + 8` 16-bit values.
pub(super) fn pipe_smem(tiles: usize, head_dim: usize) -> usize {
    tiles * (head_dim + 8) * 2
}

/// Dynamic shared memory of the 8-bit kernels with `tile`-key tiles (see `KV8_STAGE_OFF`
/// in attention.cu): the 16-bit K and V tiles (`tile` rows of `head_dim + 8`), the 8-bit
/// staging of the next tile (K and V, `tile` rows of `head_dim` bytes) and `tile` f32
/// scales each for K and V.
pub(super) fn kv8_smem(tile: usize, head_dim: usize) -> usize {
    2 * tile * (head_dim + 8) * 2 + 2 * tile * head_dim + 2 * tile * 4
}

/// The 8-bit kernels' key tile: 32 keys (half the shared memory, so twice the resident
/// one-warp CTAs per SM: the 64-key tile measured slower, latency-bound at four CTAs per
/// SM on the H200 at head_dim 128) or 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kv8Tile {
    N32,
    N64,
}

impl Kv8Tile {
    pub fn keys(self) -> usize {
        match self {
            Kv8Tile::N32 => 32,
            Kv8Tile::N64 => 64,
        }
    }
}

/// The kernel that attends runs of more than 64 rows per KV head (phase 1, prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongKernel {
    /// 4 warps x 16 rows, K and V loaded together per tile (the first version).
    Simple,
    /// 4 warps x 32 rows, two-stage K/V buffers, 64-key tiles.
    M32,
    /// 4 warps x 32 rows, two-stage K/V buffers, 32-key tiles.
    M32N32,
    /// Hopper only (sm_90a, head_dim 128; `attention_sm90.cu`): wgmma, a producer
    /// warpgroup filling a two-stage K/V ring behind mbarriers, two consumer warpgroups
    /// of 64 rows, 128-key tiles, each consumer computing the softmax of tile t while
    /// the tensor cores add tile t - 1's P.V (FlashAttention-3's intra-warpgroup
    /// overlap), the two consumers running freely. The tiles come by bulk tensor copies
    /// (TMA) when the plan was uploaded with tensor maps (see
    /// [`SegmentAttention::long_runs`]) and [`AttnKernels::tma`] is on, else by cp.async
    /// from the producer warpgroup. Elsewhere (or at other head dims) [`LongKernel::M32`]
    /// runs instead, as for the two below. K and V have their own mbarriers, so that K(t)
    /// is freed as soon as S(t) is done and the next loads overlap the softmax. 541-554
    /// TFLOP/s on the 8B phase-1 shape (H200, 2026-12-02 08:30 UTC).
    HopperV2,
    /// [`LongKernel::HopperV2`] with FlashAttention-3's inter-warpgroup ping-pong: the
    /// two consumers take turns at issuing their products (named barriers), so that one's
    /// softmax runs under the other's products. 524-530 TFLOP/s at 128-key tiles.
    HopperPingPong,
    /// [`LongKernel::HopperPingPong`] with 176-key tiles (FlashAttention-3's tile at
    /// head_dim 128): the exponentials written over S, packed into P after the previous
    /// P.V (the registers for S, P, the next P and O do not fit at 176 keys). The default
    /// ([`HOPPER_DEFAULT`]): 589-625 TFLOP/s (mma.sync M32: 344).
    HopperPingPong176,
}

impl LongKernel {
    /// Whether this is one of the sm_90a kernels.
    pub fn is_hopper(self) -> bool {
        matches!(
            self,
            LongKernel::HopperV2 | LongKernel::HopperPingPong | LongKernel::HopperPingPong176
        )
    }

    /// Keys per tile of a Hopper kernel (they load their tiles in boxes of this many
    /// keys: see tma.rs).
    pub fn hopper_keys(self) -> usize {
        match self {
            LongKernel::HopperPingPong176 => 176,
            _ => 128,
        }
    }
}

/// The long-run kernel on a Hopper GPU at head_dim 128: the fastest of the three on the
/// 8B phase-1 shape (README, "Phase-1 attention on Hopper tensor cores").
pub const HOPPER_DEFAULT: LongKernel = LongKernel::HopperPingPong176;

/// Dynamic shared memory of the Hopper kernels with `keys`-key tiles (mirrors
/// `s9_bar` and the slack in attention_sm90.cu): the Q tile (128 rows) and two stages of
/// K and V tiles at head_dim 128, four mbarriers a stage, and 1 KiB of slack to align the
/// base to the 1 KiB swizzle period.
pub(super) fn sm90_smem(keys: usize) -> usize {
    const STAGES: usize = 2;
    2 * 128 * 128 + STAGES * 2 * 2 * keys * 128 + 32 * STAGES + 1024
}

/// The kernel that attends at most 16 rows per KV head (decoding a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// One warp, K and V loaded together per tile.
    W1,
    /// [`DecodeKernel::W1`] with Q staged through shared memory (the earlier version; it
    /// loads Q into registers straight from global memory).
    W1QSmem,
    /// One warp, Q in registers, two-stage 32-key K/V buffers.
    P1N32,
    /// Up to 8 rows (a decode's GQA group; more fall back to [`DecodeKernel::W1`]), 16-
    /// or 8-bit items: the operands swapped (`S^T = K Q^T`, `O^T = V^T P^T`: half the
    /// products), fragments read straight from a ring of staged tiles, 8-bit values
    /// widened in registers (`attn_fwd_swap`).
    Swap,
}

/// Dynamic shared memory of `attn_fwd_swap` (`SWAP_STAGES` slots of `SW_SLOT` bytes in
/// attention.cu: a 32-key 8-bit tile or a 16-key 16-bit tile, rows padded against bank
/// conflicts).
pub(super) fn swap_smem(head_dim: usize) -> usize {
    let k8 = if head_dim.is_multiple_of(128) {
        head_dim + 64
    } else {
        head_dim
    };
    let slot8 = 32 * (k8 + head_dim + 16);
    let slot16 = 16 * 2 * (2 * head_dim + 16);
    swap_stages() * slot8.max(slot16)
}

/// Tiles `attn_fwd_swap` stages ahead: 2, or env `STARKV_SWAP_STAGES` (2-6; A/B runs).
pub(super) fn swap_stages() -> usize {
    std::env::var("STARKV_SWAP_STAGES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (2..=6).contains(n))
        .unwrap_or(2)
}

/// Which kernels [`Gpu::attention`] launches, by rows per KV head (`m * group`): at most
/// 16 rows `decode`, 17 to 64 rows the 64-row simple kernel, more `long`. Defaults from
/// the measurements in PERF_NOTES.md and the README; env
/// `STARKV_ATTN_LONG=simple|m32|m32n32|hopper-v2|hopper-pp|hopper-pp176` (`hopper`: the
/// Hopper default) and `STARKV_ATTN_DECODE=w1|p1n32|w1-qsmem|swap` override them (A/B runs). On a
/// Hopper GPU (compute capability 9.0) the long kernel defaults to [`HOPPER_DEFAULT`]
/// (at head_dim 128; [`LongKernel::M32`] at other head dims); env `STARKV_ATTN_SM90=0`
/// keeps it off (and uncompiled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnKernels {
    pub long: LongKernel,
    pub decode: DecodeKernel,
    /// The 8-bit kernels' key tile (plans with 8-bit items).
    pub kv8: Kv8Tile,
    /// Whether decodes over 8-bit items (up to 8 rows per KV head) run the swapped-operand
    /// kernel whatever `decode` says: 1.35x the 8-bit kernels' speed on the 8B shape at
    /// 128K (H200, 2026-12-02 22:27 UTC; the kernel passed the selftest's 8-bit cases).
    /// On by default; env `STARKV_ATTN_SWAP8=0` keeps the 8-bit one-warp kernels.
    pub swap_kv8: bool,
    /// Whether the device runs the Hopper kernels (compute capability 9.0 and not
    /// switched off): without it that choice falls back to [`LongKernel::M32`].
    pub hopper: bool,
    /// Whether the Hopper kernels load tiles by TMA where the plan has tensor maps (env
    /// `STARKV_ATTN_TMA=0`: cp.async always; A/B runs).
    pub tma: bool,
}

impl Default for AttnKernels {
    fn default() -> Self {
        Self {
            long: LongKernel::M32,
            decode: DecodeKernel::W1,
            kv8: Kv8Tile::N32,
            swap_kv8: true,
            hopper: false,
            tma: true,
        }
    }
}

impl AttnKernels {
    /// Every kernel the selftest must cover.
    pub const ALL_LONG: [LongKernel; 6] = [
        LongKernel::Simple,
        LongKernel::M32,
        LongKernel::M32N32,
        LongKernel::HopperV2,
        LongKernel::HopperPingPong,
        LongKernel::HopperPingPong176,
    ];
    pub const ALL_DECODE: [DecodeKernel; 4] = [
        DecodeKernel::W1,
        DecodeKernel::P1N32,
        DecodeKernel::W1QSmem,
        DecodeKernel::Swap,
    ];
    pub const ALL_KV8: [Kv8Tile; 2] = [Kv8Tile::N32, Kv8Tile::N64];

    /// A number that tells the kernel choices apart (part of a decode graph's key).
    pub fn code(&self) -> u64 {
        let long = match self.long {
            LongKernel::Simple => 0,
            LongKernel::M32 => 1,
            LongKernel::M32N32 => 2,
            LongKernel::HopperV2 => 4,
            LongKernel::HopperPingPong => 5,
            LongKernel::HopperPingPong176 => 6,
        };
        let decode = match self.decode {
            DecodeKernel::W1 => 0,
            DecodeKernel::P1N32 => 1,
            DecodeKernel::W1QSmem => 2,
            DecodeKernel::Swap => 3,
        };
        let kv8 = match self.kv8 {
            Kv8Tile::N32 => 0,
            Kv8Tile::N64 => 1,
        };
        (self.swap_kv8 as u64) * 256 + (self.tma as u64) * 128 + kv8 * 64 + long * 4 + decode
    }

    /// The choice for a device of compute capability `cc`, with the env overrides.
    pub(super) fn from_env(cc: (i32, i32)) -> Self {
        let hopper = cc == (9, 0)
            && !matches!(
                std::env::var("STARKV_ATTN_SM90").as_deref(),
                Ok("0" | "off" | "false")
            );
        let mut k = Self {
            hopper,
            long: if hopper {
                HOPPER_DEFAULT
            } else {
                LongKernel::M32
            },
            ..Self::default()
        };
        match std::env::var("STARKV_ATTN_LONG").as_deref() {
            Ok("simple") => k.long = LongKernel::Simple,
            Ok("m32") => k.long = LongKernel::M32,
            Ok("m32n32") => k.long = LongKernel::M32N32,
            Ok("hopper") => k.long = HOPPER_DEFAULT,
            Ok("hopper-v2") => k.long = LongKernel::HopperV2,
            Ok("hopper-pp") => k.long = LongKernel::HopperPingPong,
            Ok("hopper-pp176") => k.long = LongKernel::HopperPingPong176,
            _ => {}
        }
        if matches!(
            std::env::var("STARKV_ATTN_TMA").as_deref(),
            Ok("0" | "off" | "false")
        ) {
            k.tma = false;
        }
        match std::env::var("STARKV_ATTN_DECODE").as_deref() {
            Ok("w1") => k.decode = DecodeKernel::W1,
            Ok("p1n32") => k.decode = DecodeKernel::P1N32,
            Ok("w1-qsmem") => k.decode = DecodeKernel::W1QSmem,
            Ok("swap") => k.decode = DecodeKernel::Swap,
            _ => {}
        }
        if matches!(
            std::env::var("STARKV_ATTN_SWAP8").as_deref(),
            Ok("0" | "off" | "false")
        ) {
            k.swap_kv8 = false;
        }
        match std::env::var("STARKV_ATTN_KV8").as_deref() {
            Ok("n32") => k.kv8 = Kv8Tile::N32,
            Ok("n64") => k.kv8 = Kv8Tile::N64,
            _ => {}
        }
        k
    }

    /// Whether the kernel [`AttnKernels::launch`] picks for `rows` rows reads the items'
    /// `log2_weight` (the `attn_simple_body` kernels: every decode kernel but the
    /// pipelined A/B alternative, and the simple kernel up to 64 rows).
    pub(super) fn reads_weights(&self, rows: usize, head_dim: usize, kv8: bool) -> bool {
        let (name, ..) = self.launch(rows, head_dim, kv8);
        matches!(
            name,
            "attn_fwd_w1" | "attn_fwd_w1_qsmem" | "attn_fwd_simple" | "attn_fwd_swap"
        ) || name.contains("_kv8")
    }

    /// `(kernel, rows per CTA, threads, dynamic shared memory bytes)` for `rows` rows
    /// per KV head. The 32-row-per-warp kernels hold 128 f32 accumulators per thread at
    /// head_dim 128; above that they would spill, so larger heads use the simple kernel.
    /// A plan with 8-bit items (`kv8`) runs the unpipelined kernels' 8-bit variants
    /// (one warp up to 16 rows, four above): phase 2 over 8-bit blocks, where the
    /// decode step is what the bytes matter for.
    pub(super) fn launch(
        &self,
        rows: usize,
        head_dim: usize,
        kv8: bool,
    ) -> (&'static str, usize, u32, usize) {
        let swap = self.decode == DecodeKernel::Swap || (kv8 && self.swap_kv8);
        if swap && rows <= 8 && head_dim.is_multiple_of(64) {
            return ("attn_fwd_swap", 8, 32, swap_smem(head_dim));
        }
        if kv8 {
            let smem = kv8_smem(self.kv8.keys(), head_dim);
            return match (rows <= 16, self.kv8) {
                (true, Kv8Tile::N32) => ("attn_fwd_w1_kv8", 16, 32, smem),
                (false, Kv8Tile::N32) => ("attn_fwd_simple_kv8", 64, 128, smem),
                (true, Kv8Tile::N64) => ("attn_fwd_w1_kv8_n64", 16, 32, smem),
                (false, Kv8Tile::N64) => ("attn_fwd_simple_kv8_n64", 64, 128, smem),
            };
        }
        if rows <= 16 {
            return match self.decode {
                DecodeKernel::W1 | DecodeKernel::Swap => ("attn_fwd_w1", 16, 32, 0),
                DecodeKernel::W1QSmem => ("attn_fwd_w1_qsmem", 16, 32, 0),
                DecodeKernel::P1N32 => ("attn_fwd_p1n32", 16, 32, pipe_smem(4 * 32, head_dim)),
            };
        }
        let long = match self.long {
            l if l.is_hopper() && (!self.hopper || head_dim != 128) => LongKernel::M32,
            other => other,
        };
        let long = match long {
            LongKernel::M32 | LongKernel::M32N32 if head_dim > 128 => LongKernel::Simple,
            other => other,
        };
        if rows <= 64 {
            return ("attn_fwd_simple", 64, 128, 0);
        }
        match long {
            LongKernel::Simple => ("attn_fwd_simple", 64, 128, 0),
            LongKernel::M32 => ("attn_fwd_m32", 128, 128, pipe_smem(4 * 64 + 128, head_dim)),
            LongKernel::M32N32 => (
                "attn_fwd_m32n32",
                128,
                128,
                pipe_smem(4 * 32 + 128, head_dim),
            ),
            LongKernel::HopperV2 => ("attn_fwd_sm90_v2", 128, 384, sm90_smem(128)),
            LongKernel::HopperPingPong => ("attn_fwd_sm90_pp", 128, 384, sm90_smem(128)),
            LongKernel::HopperPingPong176 => ("attn_fwd_sm90_pp176", 128, 384, sm90_smem(176)),
        }
    }
}

/// One entry of the attention kernel's key table (mirrors `AttnItem` in attention.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnItem {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub key_begin: i32,
    pub key_end: i32,
    pub causal_offset: i32,
    /// 0 for 16-bit K/V; else the byte offset from `k` (and from `v`) to the rows' f16
    /// scales of an 8-bit segment, plus 1 when its values are fp8 e4m3 rather than int8
    /// (see [`Segment::scale_off`]).
    pub scale_off: i64,
    /// Added to the scores of the item's keys in log2 units (see
    /// [`Segment::log2_weight`]).
    pub log2_weight: f32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<AttnItem>() == 56);

/// A run of keys for attention: element `(kv head h, key j, i)` at
/// `k + 2 * (h * head_stride + j * row_stride + i)` bytes (16-bit values), or, for an
/// 8-bit segment (`scale_off != 0`), the int8 (or, when `scale_off` is odd, the fp8
/// e4m3 code) at byte `k + h * head_stride + j * row_stride + i` with
/// `row_stride == head_dim`, scaled by the IEEE f16 at byte
/// `k + (scale_off & !1) + 2 * (h * head_stride / row_stride + j)` (the same for `v`).
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub len: usize,
    /// `None`: every key visible; `Some(o)`: query token `t` sees keys `j <= t + o`.
    pub causal_offset: Option<usize>,
    /// 0: 16-bit values; else 8-bit ones with per-row scales this many bytes after them
    /// (an even count), plus 1 for fp8 e4m3 values (int8 otherwise).
    pub scale_off: i64,
    /// Added to every score of these keys, in log2 units (0: none): `log2 S` puts the
    /// blocks of APE's tempered group at `T = 1` in the same plan as the other keys
    /// (their group's weight `S` is a bias of `ln S` on each of their scores), so a
    /// tempered decode step is one launch and can be a graph. Only the kernels of
    /// [`AttnKernels::reads_weights`] read it.
    pub log2_weight: f32,
}

impl Segment {
    /// These keys with every score biased by `log2_weight` (log2 units).
    pub fn weighted(self, log2_weight: f32) -> Self {
        Self {
            log2_weight,
            ..self
        }
    }
}

/// How an attention call's keys are split over grid z: items and per-split item ranges.
#[derive(Debug, Clone, Default)]
pub struct AttnPlan {
    pub items: Vec<AttnItem>,
    /// `splits + 1` offsets into `items`.
    pub split_begin: Vec<i32>,
}

impl AttnPlan {
    pub fn n_splits(&self) -> usize {
        self.split_begin.len() - 1
    }

    /// Whether any item is 8-bit (the launch then takes the 8-bit kernels).
    pub fn kv8(&self) -> bool {
        self.items.iter().any(|i| i.scale_off != 0)
    }

    /// Adds empty splits up to `n` (an empty split contributes `lse = -inf`, weight 0 in
    /// the merge): a captured decode graph keeps one grid size while the keys grow.
    pub fn pad_splits(&mut self, n: usize) {
        let last = *self.split_begin.last().unwrap_or(&0);
        while self.n_splits() < n {
            self.split_begin.push(last);
        }
    }

    /// One split over every segment (one running softmax, direct output), or, when
    /// `target_splits > 1`, the keys of all segments in order cut into
    /// `min(target_splits, total / 16)` splits of nearly equal key counts (cut points
    /// rounded down to multiples of 16 keys of the concatenation: counts differ by less
    /// than 32), merged afterwards by log-sum-exp. A
    /// split may span segments (an item per piece): every split CTA streams the same
    /// bytes, so that a decode step's splits fill one wave and end together (the
    /// per-segment plan left a short remainder split per segment and, at 128K keys, more
    /// CTAs than one wave holds).
    pub fn new(segments: &[Segment], target_splits: usize) -> Self {
        const CUT: usize = 16;
        let segments: Vec<&Segment> = segments.iter().filter(|s| s.len > 0).collect();
        let total: usize = segments.iter().map(|s| s.len).sum();
        let n = target_splits.min(total / CUT).max(1);
        if n <= 1 {
            return Self::one_split(&segments);
        }
        let mut plan = AttnPlan {
            items: Vec::new(),
            split_begin: vec![0],
        };
        // Split i covers keys cut(i) .. cut(i + 1) of the concatenation.
        let cut = |i: usize| {
            if i >= n {
                total
            } else {
                (total * i / n) / CUT * CUT
            }
        };
        let (mut seg, mut seg_start) = (0usize, 0usize);
        for i in 0..n {
            let (a, b) = (cut(i), cut(i + 1));
            let mut pos = a;
            while pos < b {
                while seg_start + segments[seg].len <= pos {
                    seg_start += segments[seg].len;
                    seg += 1;
                }
                let end = b.min(seg_start + segments[seg].len);
                plan.items
                    .push(Self::item(segments[seg], pos - seg_start, end - seg_start));
                pos = end;
            }
            plan.split_begin.push(plan.items.len() as i32);
        }
        plan
    }

    /// The earlier plan (env `STARKV_SPLIT_PLAN=segment`, A/B runs): one split over
    /// every segment when `target_splits <= 1`, else each segment cut on its own into
    /// chunks of about `total / target_splits` keys (multiples of 64, at least 512), one
    /// split per chunk.
    pub fn per_segment(segments: &[Segment], target_splits: usize) -> Self {
        let segments: Vec<&Segment> = segments.iter().filter(|s| s.len > 0).collect();
        if target_splits <= 1 {
            return Self::one_split(&segments);
        }
        let mut plan = AttnPlan {
            items: Vec::new(),
            split_begin: vec![0],
        };
        let total: usize = segments.iter().map(|s| s.len).sum();
        let chunk = total.div_ceil(target_splits).div_ceil(64).max(8) * 64;
        for s in segments {
            let mut a = 0;
            while a < s.len {
                let b = (a + chunk).min(s.len);
                plan.items.push(Self::item(s, a, b));
                plan.split_begin.push(plan.items.len() as i32);
                a = b;
            }
        }
        if plan.items.is_empty() {
            plan.split_begin.push(0);
        }
        plan
    }

    /// The balanced plan on whole tiles (env `STARKV_SPLIT_PLAN=tiles`; not yet measured
    /// on a GPU, see the README): every segment in 64-key tiles (its last one partial),
    /// `min(target_splits, tiles)` splits of equal tile counts (differing by at most one),
    /// cut on tile boundaries of their segments. [`AttnPlan::new`]'s cuts on multiples of
    /// 16 keys leave a partial tile per split (two where a split spans segments), so its
    /// longest split can take a tile more than the keys need.
    pub fn tiles(segments: &[Segment], target_splits: usize) -> Self {
        const TILE: usize = 64;
        let segments: Vec<&Segment> = segments.iter().filter(|s| s.len > 0).collect();
        let counts: Vec<usize> = segments.iter().map(|s| s.len.div_ceil(TILE)).collect();
        let total: usize = counts.iter().sum();
        let n = target_splits.min(total).max(1);
        if n <= 1 {
            return Self::one_split(&segments);
        }
        let mut plan = AttnPlan {
            items: Vec::new(),
            split_begin: vec![0],
        };
        // Split i covers tiles total * i / n .. total * (i + 1) / n of the concatenation.
        let (mut seg, mut seg_tile0) = (0usize, 0usize);
        for i in 0..n {
            let (a, b) = (total * i / n, total * (i + 1) / n);
            let mut t = a;
            while t < b {
                while seg_tile0 + counts[seg] <= t {
                    seg_tile0 += counts[seg];
                    seg += 1;
                }
                let end = b.min(seg_tile0 + counts[seg]);
                let s = segments[seg];
                let keys = (
                    (t - seg_tile0) * TILE,
                    ((end - seg_tile0) * TILE).min(s.len),
                );
                plan.items.push(Self::item(s, keys.0, keys.1));
                t = end;
            }
            plan.split_begin.push(plan.items.len() as i32);
        }
        plan
    }

    /// [`AttnPlan::new`], [`AttnPlan::tiles`] or [`AttnPlan::per_segment`], as the GPU's
    /// [`SplitTuning`](super::SplitTuning) says.
    pub fn for_gpu(gpu: &Gpu, segments: &[Segment], target_splits: usize) -> Self {
        let tuning = gpu.split_tuning();
        match (tuning.balanced, tuning.tile_cuts) {
            (true, false) => Self::new(segments, target_splits),
            (true, true) => Self::tiles(segments, target_splits),
            (false, _) => Self::per_segment(segments, target_splits),
        }
    }

    /// One split walking every (non-empty) segment.
    fn one_split(segments: &[&Segment]) -> Self {
        let items: Vec<AttnItem> = segments.iter().map(|s| Self::item(s, 0, s.len)).collect();
        AttnPlan {
            split_begin: vec![0, items.len() as i32],
            items,
        }
    }

    /// Keys `a..b` of segment `s`.
    fn item(s: &Segment, a: usize, b: usize) -> AttnItem {
        AttnItem {
            k: s.k,
            v: s.v,
            head_stride: s.head_stride,
            row_stride: s.row_stride,
            key_begin: a as i32,
            key_end: b as i32,
            causal_offset: s.causal_offset.map_or(-1, |o| o as i32),
            scale_off: s.scale_off,
            log2_weight: s.log2_weight,
            pad: 0,
        }
    }
}

impl Gpu {
    /// Selects the attention kernels (benchmarks and the selftest switch them).
    pub fn set_attention_kernels(&self, kernels: AttnKernels) {
        *self.attn.lock().unwrap() = kernels;
    }

    pub fn attention_kernels(&self) -> AttnKernels {
        *self.attn.lock().unwrap()
    }

    /// The attention kernel [`Gpu::attention`] launches for `rows` rows per KV head.
    pub fn attention_kernel_name(&self, rows: usize, head_dim: usize) -> &'static str {
        self.attention_kernels().launch(rows, head_dim, false).0
    }

    /// The attention kernel for `rows` rows per KV head of a plan with 8-bit items.
    pub fn attention_kernel_name_kv8(&self, rows: usize, head_dim: usize) -> &'static str {
        self.attention_kernels().launch(rows, head_dim, true).0
    }

    /// Splits that keep the GPU busy: about four waves of the 4-warp CTAs (two resident
    /// per SM), or, for decoding (`m * group <= 16`, one-warp CTAs), one wave of
    /// [`SplitTuning::decode_per_sm`](super::SplitTuning::decode_per_sm) CTAs per SM (four;
    /// six fit); chunks of >= 256 keys.
    pub fn choose_splits(&self, m: usize, shape: HeadShape, total_keys: usize) -> usize {
        self.choose_splits_for(m, shape, total_keys, false)
    }

    /// [`Gpu::choose_splits`] for a plan whose keys are (some of them) 8-bit blocks
    /// (`eight_bit`): a decode then uses twice the splits. The 8-bit kernels' one-warp
    /// CTAs wait on their shared-memory widening, so they need more of them in flight:
    /// at 128K cached tokens on the H200 (2026-12-02 12:17 UTC, `gpu_speed`), the 8B
    /// shape's fp8 / int8 decode attention took 0.212 / 0.223 ms at the 16-bit count (66
    /// splits) and 0.139 / 0.143 ms at twice it, against 0.144 ms for bf16; SmolLM2's
    /// shape 0.057 vs 0.039-0.040 ms (bf16 0.036).
    ///
    /// A decode the swapped-operand kernel runs (`attn_fwd_swap`: the 8-bit default)
    /// fills one wave of its CTAs instead: as many per SM as the occupancy calculator
    /// says fit ([`Kernels::swap_ctas_per_sm`]: 10 at head_dim 128, 16 at 64 on the
    /// H200). Its speed grows with the CTAs in flight up to that and falls past it, where
    /// a second, partial wave follows (H200, 2026-12-03, 128K tokens, int8: 8B shape
    /// 0.176 / 0.105 / 0.104 ms at 4 / 8 / 10 CTAs per SM, 0.138 at 12, 0.121 at 16;
    /// SmolLM2's shape 0.035 ms at 8 per SM, 0.031 at 11.6, the 512-split cap).
    pub fn choose_splits_for(
        &self,
        m: usize,
        shape: HeadShape,
        total_keys: usize,
        eight_bit: bool,
    ) -> usize {
        let splits = self.choose_splits_16(m, shape, total_keys);
        let (kernel, ..) =
            self.attention_kernels()
                .launch(m * shape.group(), shape.head_dim, eight_bit);
        let per_sm = if kernel == "attn_fwd_swap" {
            self.kernels(shape.head_dim)
                .map_or(0, |k| k.swap_ctas_per_sm)
        } else {
            0
        };
        if per_sm > 0 {
            let wave = per_sm * self.sm_count() / shape.n_kv_heads.max(1);
            return wave.min(total_keys / 256).clamp(splits, 512);
        }
        if eight_bit && m * shape.group() <= 16 {
            (2 * splits).min(total_keys / 256).clamp(splits, 512)
        } else {
            splits
        }
    }

    fn choose_splits_16(&self, m: usize, shape: HeadShape, total_keys: usize) -> usize {
        let (group, n_kv) = (shape.group(), shape.n_kv_heads);
        let rows = m * group;
        let (_, per_cta, _, _) = self.attention_kernels().launch(rows, shape.head_dim, false);
        let (ctas, target) = if rows <= 16 {
            (n_kv, self.split_tuning().decode_per_sm() * self.sm_count())
        } else {
            (rows.div_ceil(per_cta) * n_kv, 8 * self.sm_count())
        };
        if ctas >= target / 2 {
            return 1;
        }
        // Decode CTAs round down to one wave of `decode_per_sm` per SM: rounding up put
        // 4 of 664 CTAs (83 splits x 8 KV heads at five per SM) in a second wave, and the
        // 8B shape's decode attention at 128K took 0.147-0.148 ms against 0.142 at four
        // or six per SM (H200, 2026-12-02).
        let want = if rows <= 16 {
            target / ctas.max(1)
        } else {
            target.div_ceil(ctas.max(1))
        };
        want.min(total_keys / 256).clamp(1, 512)
    }

    /// Attention of 16-bit `q` (`[m][nh d]`) over the planned keys. With one split the
    /// normalised output goes straight to `out` (16-bit); otherwise partials go to
    /// `scratch` and are merged into `out`. `out_f32`: write f32 O and `lse` instead.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan_items: u64,
        plan_splits: u64,
        n_splits: usize,
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        let plan = (plan_items, plan_splits, n_splits);
        self.attention_scaled(k, q, m, nh, nkv, plan, 1.0, out, scratch)
    }

    /// [`Gpu::attention`] over a plan with 8-bit items ([`AttnPlan::kv8`]; 16-bit items
    /// may be mixed in).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_kv8(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan: (u64, u64, usize),
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        self.attention_with(k, q, m, nh, nkv, plan, 0, 1.0, true, out, scratch)
    }

    /// [`Gpu::attention`] over a plan uploaded with its tensor maps (`tmaps`, from
    /// [`upload_plans_with_maps`]; 0 for none): the Hopper kernels then load by TMA.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_maps(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan: (u64, u64, usize),
        tmaps: u64,
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        self.attention_with(k, q, m, nh, nkv, plan, tmaps, 1.0, false, out, scratch)
    }

    /// [`Gpu::attention`] at softmax scale `score_scale / sqrt(d)` (the tempered group of
    /// a [`crate::partial::ContextMerge`] uses `1 / T`); `plan` is `(items, splits, n)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_scaled(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan: (u64, u64, usize),
        score_scale: f32,
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        self.attention_with(k, q, m, nh, nkv, plan, 0, score_scale, false, out, scratch)
    }

    /// The launch behind [`Gpu::attention_scaled`]; `kv8`: the plan has 8-bit items;
    /// `tmaps`: the plan's tensor maps (0: none).
    #[allow(clippy::too_many_arguments)]
    fn attention_with(
        &self,
        k: &Kernels,
        q: u64,
        m: usize,
        nh: usize,
        nkv: usize,
        plan: (u64, u64, usize),
        tmaps: u64,
        score_scale: f32,
        kv8: bool,
        out: AttnOut,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        let (plan_items, plan_splits, n_splits) = plan;
        if m == 0 {
            return Ok(());
        }
        let d = k.head_dim;
        let group = nh / nkv;
        let scale_log2 = (score_scale as f64 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let (m_i, g_i, nh_i) = (m as i32, group as i32, nh as i32);
        if n_splits > 1024 {
            return Err(CudaError::Invalid(format!(
                "{n_splits} attention splits (at most 1024)"
            )));
        }
        let choice = self.attention_kernels();
        let (name, rows_per_cta, threads, smem) = choice.launch(m * group, d, kv8);
        // The Hopper kernels' TMA twins take the tensor maps as an 11th parameter.
        let tma_name = match name {
            "attn_fwd_sm90_v2" => Some("attn_fwd_sm90_v2_tma"),
            "attn_fwd_sm90_pp" => Some("attn_fwd_sm90_pp_tma"),
            "attn_fwd_sm90_pp176" => Some("attn_fwd_sm90_pp176_tma"),
            _ => None,
        }
        .filter(|_| choice.tma && tmaps != 0);
        let name = tma_name.unwrap_or(name);
        let func = if name.starts_with("attn_fwd_sm90") {
            self.sm90_kernel(name)?
        } else {
            k.get(name).clone()
        };
        let launch = LaunchConfig {
            grid_dim: (
                ((m * group).div_ceil(rows_per_cta)) as u32,
                nkv as u32,
                n_splits.max(1) as u32,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let direct = n_splits == 1 && matches!(out, AttnOut::Half(_));
        // The split merge inside the attention kernel (decode kernels only).
        let fused = (!direct && self.split_tuning().fused_merge)
            .then(|| {
                FUSED_MERGE
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|&(_, f)| f)
            })
            .flatten();
        let null = 0u64;
        // One kernel writing the 16-bit output, or splits writing f32 partials that
        // `attn_merge` reduces.
        let (out_h, po, pl) = if direct {
            let AttnOut::Half(o) = out else {
                unreachable!()
            };
            (o, null, null)
        } else {
            let splits = n_splits.max(1);
            scratch.ensure(self, splits * m * nh * d * 4, splits * nh * m * 4)?;
            let (po, pl) = (
                scratch.o.as_ref().unwrap().ptr(),
                scratch.lse.as_ref().unwrap().ptr(),
            );
            (null, po, pl)
        };
        if let Some(fm) = fused {
            let splits = n_splits.max(1);
            let (oh, of, lf) = out.pointers();
            let counters = launch.grid_dim.0 as usize * nkv * FM_COUNTERS * 4;
            scratch.ensure_counters(self, counters)?;
            let cnt = scratch.counters.as_ref().unwrap().ptr();
            let group = self.split_tuning().fused_merge_group(splits) as i32;
            let mut params = [
                arg(&q),
                arg(&m_i),
                arg(&g_i),
                arg(&nh_i),
                arg(&plan_items),
                arg(&plan_splits),
                arg(&scale_log2),
                arg(&oh),
                arg(&of),
                arg(&lf),
                arg(&po),
                arg(&pl),
                arg(&cnt),
                arg(&group),
            ];
            // SAFETY: the `_fm` kernels' arguments in order (attn_fwd_w1_fm and
            // ATTN_KV8_FM_KERNEL): the outputs, the partials sized for `splits` splits
            // above, zeroed counters for every (row block, KV head) of the grid, and a
            // group size with at most 32 groups of at most 32 splits; they wait with
            // `pdl_wait()` first.
            unsafe {
                self.launch_dependent(k.get(fm), launch, &mut params, Some(Dependent::Attention))?
            };
            return Ok(());
        }
        let mut params = vec![
            arg(&q),
            arg(&m_i),
            arg(&g_i),
            arg(&nh_i),
            arg(&plan_items),
            arg(&plan_splits),
            arg(&scale_log2),
            arg(&out_h),
            arg(&po),
            arg(&pl),
        ];
        if tma_name.is_some() {
            params.push(arg(&tmaps));
        }
        let family = WAIT_FOR_PREDECESSOR
            .contains(&name)
            .then_some(Dependent::Attention);
        // SAFETY: the arguments of `attn_simple_body`'s and `attn_pipe_body`'s kernels in
        // order (they share the signature; the Hopper kernels' too, the TMA twins with the
        // tensor maps last); only kernels that wait with `pdl_wait()` are launched as
        // dependents.
        unsafe { self.launch_dependent(&func, launch, &mut params, family)? };
        if direct {
            return Ok(());
        }
        self.merge_partials(k, (po, pl), n_splits.max(1), m, nh, out)
    }

    /// Merges `n` partial results (`parts`: f32 O `[n][m][nh d]` and lse `[n][nh][m]`,
    /// each over a disjoint key set) exactly into `out`: the split merge of one attention,
    /// and the merge of a query's own part with same-device shards' parts.
    pub fn merge_partials(
        &self,
        k: &Kernels,
        parts: (u64, u64),
        n: usize,
        m: usize,
        nh: usize,
        out: AttnOut,
    ) -> Result<()> {
        if n > 1024 {
            return Err(CudaError::Invalid(format!(
                "{n} partials to merge (at most 1024)"
            )));
        }
        let (po, pl) = parts;
        let d = k.head_dim;
        let (oh, of, lf) = out.pointers();
        let tuning = self.split_tuning();
        // Column chunks of dc columns (a multiple of 32, dividing d) so that the merge's
        // CTAs about fill the SMs; one chunk per (token, head) without the wide merge.
        let mut chunks = 1;
        if tuning.wide_merge {
            let halves = |c: usize| {
                d.is_multiple_of(2 * c) && d / (2 * c) >= 32 && (d / (2 * c)).is_multiple_of(16)
            };
            while m * nh * chunks < self.sm_count() && halves(chunks) {
                chunks *= 2;
            }
        }
        let dc = d / chunks;
        let (s_i, m_i, nh_i, d_i, dc_i) = (n as i32, m as i32, nh as i32, d as i32, dc as i32);
        let mut params = [
            arg(&oh),
            arg(&of),
            arg(&lf),
            arg(&po),
            arg(&pl),
            arg(&s_i),
            arg(&m_i),
            arg(&nh_i),
            arg(&d_i),
            arg(&dc_i),
        ];
        // dc x G threads, G an even number of split groups (dc is a multiple of 16, so the
        // block is whole warps), about 512 threads.
        let groups = ((512 / dc) & !1).max(2);
        let cfg = LaunchConfig {
            grid_dim: (m as u32, nh as u32, chunks as u32),
            block_dim: ((dc * groups) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let family = if tuning.merge_pdl {
            Dependent::Merge
        } else {
            Dependent::Attention
        };
        // SAFETY: `attn_merge`'s arguments in order, over partials sized for (n, m, nh,
        // d), with dc dividing d; it waits with `pdl_wait()` before reading them.
        unsafe { self.launch_dependent(k.get("attn_merge"), cfg, &mut params, Some(family))? };
        Ok(())
    }
}

/// Where attention writes: the 16-bit input of the output projection, or f32 `(O, lse)`
/// in [`crate::cpu::attention::Attended`]'s layout (for shards answering a query host).
#[derive(Debug, Clone, Copy)]
pub enum AttnOut {
    Half(u64),
    F32 { out: u64, lse: u64 },
}

impl AttnOut {
    /// The kernels' three output arguments: the 16-bit output, the f32 output and the
    /// f32 lse, 0 where absent.
    fn pointers(self) -> (u64, u64, u64) {
        match self {
            AttnOut::Half(o) => (o, 0, 0),
            AttnOut::F32 { out, lse } => (0, out, lse),
        }
    }
}

/// Partial-result buffers of split attention, grown on demand, and the fused merge's
/// counters (zeroed when allocated; every launch leaves them at zero).
#[derive(Default)]
pub struct AttnScratch {
    pub o: Option<DevBuf>,
    pub lse: Option<DevBuf>,
    pub counters: Option<DevBuf>,
}

impl AttnScratch {
    /// At least `bytes` of zeroed counters for the fused merge.
    pub fn ensure_counters(&mut self, gpu: &Gpu, bytes: usize) -> Result<()> {
        if self.counters.as_ref().is_none_or(|b| b.bytes() < bytes) {
            self.counters = Some(gpu.alloc_zeros(bytes)?);
        }
        Ok(())
    }

    pub fn ensure(&mut self, gpu: &Gpu, o_bytes: usize, lse_bytes: usize) -> Result<()> {
        if self.o.as_ref().is_none_or(|b| b.bytes() < o_bytes) {
            self.o = Some(gpu.alloc(o_bytes)?);
        }
        if self.lse.as_ref().is_none_or(|b| b.bytes() < lse_bytes) {
            self.lse = Some(gpu.alloc(lse_bytes)?);
        }
        Ok(())
    }
}

/// Where a layer's new K and V rows go: element `(kv head h, new token t, i)` at
/// `k + 2 * (h * head_stride + (t0 + t) * row_stride + i)`.
#[derive(Debug, Clone, Copy)]
pub struct KvDest {
    pub k: u64,
    pub v: u64,
    pub head_stride: i64,
    pub row_stride: i32,
    pub t0: i32,
    /// When not 0: the device address of an i32 that replaces `t0` (a decode step
    /// replayed from a CUDA graph reads its row from there).
    pub t0_dev: u64,
}

/// Uploads a layer-indexed set of attention plans in one copy; returns per layer the
/// device addresses of its items and split offsets, and the split count.
pub fn upload_plans(
    gpu: &Gpu,
    table: &mut TableBuf,
    plans: &[AttnPlan],
) -> Result<Vec<(u64, u64, usize)>> {
    Ok(upload_plans_with_maps(gpu, table, plans, None)?
        .into_iter()
        .map(|(p, _)| p)
        .collect())
}

/// An uploaded plan: the device addresses of its items and split offsets, and its split
/// count.
pub type PlanPtrs = (u64, u64, usize);

/// [`upload_plans`], and with `n_kv` given, each plan's tensor maps (K and V per item,
/// see tma.rs) for the Hopper kernels' TMA loads: per layer also the maps' device
/// address, 0 where the plan cannot have maps (8-bit items, rows other than 128 values).
pub fn upload_plans_with_maps(
    gpu: &Gpu,
    table: &mut TableBuf,
    plans: &[AttnPlan],
    n_kv: Option<usize>,
) -> Result<Vec<(PlanPtrs, u64)>> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut offsets = Vec::with_capacity(plans.len());
    let mut map_offsets = Vec::with_capacity(plans.len());
    for p in plans {
        let io = bytes.len();
        bytes.extend_from_slice(bytemuck::cast_slice(&p.items));
        while !bytes.len().is_multiple_of(16) {
            bytes.push(0);
        }
        let so = bytes.len();
        bytes.extend_from_slice(bytemuck::cast_slice(&p.split_begin));
        while !bytes.len().is_multiple_of(16) {
            bytes.push(0);
        }
        offsets.push((io, so, p.n_splits()));
        let maps = n_kv.and_then(|n| super::tma::item_maps(&p.items, n).ok());
        map_offsets.push(maps.map(|m| {
            // A tensor map in global memory must be 64-byte aligned (128 in CUDA 13's type).
            while !bytes.len().is_multiple_of(128) {
                bytes.push(0);
            }
            let mo = bytes.len();
            bytes.extend_from_slice(&m);
            mo
        }));
    }
    let base = table.upload(gpu, &bytes)?;
    Ok(offsets
        .into_iter()
        .zip(map_offsets)
        .map(|((io, so, n), mo)| {
            (
                (base + io as u64, base + so as u64, n),
                mo.map_or(0, |mo| base + mo as u64),
            )
        })
        .collect())
}

/// Planned attention over key segments, for every layer of one forward pass: the one
/// path through which phase 1, phase 2, the plain KV cache and the shards plan their
/// keys ([`SegmentAttention::plan`], one upload for all layers) and launch
/// ([`SegmentAttention::attend`]). The tables and split buffers are reused call after call.
#[derive(Default)]
pub struct SegmentAttention {
    table: TableBuf,
    /// Per layer: device addresses of the items and split offsets, and the split count.
    plans: Vec<(u64, u64, usize)>,
    /// Per layer: whether the plan has 8-bit items.
    kv8: Vec<bool>,
    /// Per layer: the plan's tensor maps (0: none).
    maps: Vec<u64>,
    /// Whether plans get tensor maps (long query runs on a Hopper GPU).
    with_maps: bool,
    scratch: AttnScratch,
    shape: Option<HeadShape>,
}

impl SegmentAttention {
    /// For long query runs (phase 1): when a Hopper kernel is selected (head_dim 128) the
    /// plans are uploaded with tensor maps, so that it loads its tiles by TMA.
    pub fn long_runs() -> Self {
        Self {
            with_maps: true,
            ..Self::default()
        }
    }

    /// Uploads `plans` (one per layer) with tensor maps when this attention takes them
    /// and the device runs the Hopper kernels at this head_dim.
    fn upload(&mut self, gpu: &Gpu, shape: HeadShape, plans: &[AttnPlan]) -> Result<()> {
        let kernels = gpu.attention_kernels();
        let maps = self.with_maps
            && kernels.hopper
            && kernels.tma
            && kernels.long.is_hopper()
            && shape.head_dim == 128;
        let up = upload_plans_with_maps(
            gpu,
            &mut self.table,
            plans,
            maps.then_some(shape.n_kv_heads),
        )?;
        self.kv8 = plans.iter().map(AttnPlan::kv8).collect();
        self.plans = up.iter().map(|&(p, _)| p).collect();
        self.maps = up.iter().map(|&(_, m)| m).collect();
        self.shape = Some(shape);
        Ok(())
    }

    /// Plans `n_layers` layers, layer `l` over the keys `segments(l)`, cut into `splits`
    /// splits (see [`AttnPlan::new`]; [`Gpu::choose_splits`] gives a good count), and
    /// uploads every plan in one copy.
    pub fn plan(
        &mut self,
        gpu: &Gpu,
        shape: HeadShape,
        n_layers: usize,
        splits: usize,
        mut segments: impl FnMut(usize) -> Vec<Segment>,
    ) -> Result<()> {
        let plans: Vec<AttnPlan> = (0..n_layers)
            .map(|l| AttnPlan::for_gpu(gpu, &segments(l), splits))
            .collect();
        self.upload(gpu, shape, &plans)
    }

    /// [`SegmentAttention::plan`] for a captured decode graph: every layer's plan padded
    /// with empty splits to `*pad_to` splits (one grid size from step to step); when a
    /// plan needs more (or far fewer), `*pad_to` changes and so does the graph's key.
    pub fn plan_padded(
        &mut self,
        gpu: &Gpu,
        shape: HeadShape,
        n_layers: usize,
        splits: usize,
        pad_to: &mut usize,
        mut segments: impl FnMut(usize) -> Vec<Segment>,
    ) -> Result<()> {
        let mut plans: Vec<AttnPlan> = (0..n_layers)
            .map(|l| AttnPlan::for_gpu(gpu, &segments(l), splits))
            .collect();
        let most = plans.iter().map(AttnPlan::n_splits).max().unwrap_or(1);
        // Grown with headroom when a plan needs more; shrunk when plans need far fewer
        // (another split count or plan): empty splits still launch CTAs.
        if most > *pad_to || most + 16 < *pad_to {
            *pad_to = (most + 8).max(2);
        }
        for p in &mut plans {
            p.pad_splits(*pad_to);
        }
        self.upload(gpu, shape, &plans)
    }

    /// Every device address and launch size the planned launches bake in (the tables,
    /// the split counts, the split buffers): part of a decode graph's key.
    pub fn graph_key(&self) -> Vec<u64> {
        let mut key: Vec<u64> = self
            .plans
            .iter()
            .flat_map(|&(items, splits, n)| [items, splits, n as u64])
            .collect();
        key.extend(self.kv8.iter().map(|&b| b as u64));
        key.extend(self.maps.iter().copied());
        key.push(self.scratch.o.as_ref().map_or(0, DevBuf::ptr));
        key.push(self.scratch.lse.as_ref().map_or(0, DevBuf::ptr));
        key.push(self.scratch.counters.as_ref().map_or(0, DevBuf::ptr));
        key
    }

    /// Attention of `m` tokens' rotated `q` (16-bit `[m][n_heads d]`) over layer
    /// `layer`'s planned keys into `out`.
    pub fn attend(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        out: AttnOut,
    ) -> Result<()> {
        self.attend_scaled(gpu, kernels, layer, q, m, 1.0, out)
    }

    /// [`SegmentAttention::attend`] at softmax scale `score_scale / sqrt(d)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_scaled(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        layer: usize,
        q: u64,
        m: usize,
        score_scale: f32,
        out: AttnOut,
    ) -> Result<()> {
        let (Some(shape), Some(&plan)) = (self.shape, self.plans.get(layer)) else {
            return Err(CudaError::Invalid(format!(
                "attention of layer {layer} before it was planned"
            )));
        };
        let (nh, nkv) = (shape.n_heads, shape.n_kv_heads);
        let kv8 = self.kv8.get(layer).copied().unwrap_or(false);
        let maps = self.maps.get(layer).copied().unwrap_or(0);
        gpu.attention_with(
            kernels,
            q,
            m,
            nh,
            nkv,
            plan,
            maps,
            score_scale,
            kv8,
            out,
            &mut self.scratch,
        )
    }
}
