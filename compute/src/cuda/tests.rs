//! CPU-only tests of the CUDA backend (CI has no GPU): the probe must fail cleanly, the
//! device choice must parse, attention plans and the resident tier must be right.

use std::sync::Arc;

use super::star::{BlockTier, TierValue};
use super::*;

#[test]
fn probe_never_panics() {
    // On a machine without a driver this is Err(Unavailable); with one, a device list.
    match probe() {
        Ok(devices) => assert!(!devices.is_empty()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn auto_selection_always_succeeds() {
    let sel = select_device(DeviceChoice::Auto).unwrap();
    if let Selected::Cpu { reason } = &sel {
        assert!(reason.starts_with("auto"));
    }
    assert!(matches!(
        select_device(DeviceChoice::Cpu).unwrap(),
        Selected::Cpu { .. }
    ));
}

#[test]
fn cuda_selection_without_a_gpu_is_an_error_not_a_panic() {
    if probe().is_err() {
        assert!(matches!(
            select_device(DeviceChoice::Cuda(0)),
            Err(CudaError::Unavailable(_))
        ));
        assert!(Gpu::new(0, HalfType::BF16).is_err());
    }
    // A device number no machine has.
    assert!(select_device(DeviceChoice::Cuda(4096)).is_err());
}

#[test]
fn device_choice_parses() {
    assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
    assert_eq!("CPU".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
    assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
    assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
    assert!("cuda:x".parse::<DeviceChoice>().is_err());
    assert!("tpu".parse::<DeviceChoice>().is_err());
    assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
}

fn seg(len: usize, causal: Option<usize>) -> Segment {
    Segment {
        k: 0x1000 * (len as u64 + 1),
        v: 0x2000,
        head_stride: (len * 64) as i64,
        row_stride: 64,
        len,
        causal_offset: causal,
        scale_off: 0,
        log2_weight: 0.0,
    }
}

#[test]
fn one_split_plan_covers_every_segment_once() {
    let p = AttnPlan::new(&[seg(100, None), seg(0, None), seg(37, Some(5))], 1);
    assert_eq!(p.n_splits(), 1);
    assert_eq!(p.items.len(), 2);
    assert_eq!(
        (
            p.items[0].key_begin,
            p.items[0].key_end,
            p.items[0].causal_offset
        ),
        (0, 100, -1)
    );
    assert_eq!(
        (
            p.items[1].key_begin,
            p.items[1].key_end,
            p.items[1].causal_offset
        ),
        (0, 37, 5)
    );
}

#[test]
fn split_plan_chunks_cover_keys_exactly() {
    let segs = [seg(5000, None), seg(3000, None), seg(17, Some(9))];
    for (p, aligned) in [
        (AttnPlan::per_segment(&segs, 8), true),
        (AttnPlan::new(&segs, 8), false),
    ] {
        assert!(p.n_splits() >= 8);
        assert_eq!(p.split_begin.len(), p.n_splits() + 1);
        let mut covered = [0usize; 3];
        for it in &p.items {
            let s = segs.iter().position(|s| s.k == it.k).unwrap();
            assert_eq!(
                segs[s].causal_offset.map_or(-1, |o| o as i32),
                it.causal_offset
            );
            covered[s] += (it.key_end - it.key_begin) as usize;
            assert!(!aligned || it.key_begin % 64 == 0);
        }
        assert_eq!(covered, [5000, 3000, 17]);
    }
    for empty in [
        AttnPlan::new(&[seg(0, None)], 4),
        AttnPlan::per_segment(&[seg(0, None)], 4),
    ] {
        assert_eq!(empty.n_splits(), 1);
        assert!(empty.items.is_empty());
    }
}

/// Segments of `lens` keys at distinct addresses; the one at `causal` has a causal
/// offset of 44.
fn distinct_segments(lens: &[usize], causal: usize) -> Vec<Segment> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| Segment {
            k: 0x10_0000 * (i as u64 + 1),
            ..seg(len, (i == causal).then_some(44))
        })
        .collect()
}

/// Per split of `p`, the sum of `size` over its items.
fn split_sizes(p: &AttnPlan, size: impl Fn(usize) -> usize) -> Vec<usize> {
    p.split_begin
        .windows(2)
        .map(|w| {
            p.items[w[0] as usize..w[1] as usize]
                .iter()
                .map(|it| size((it.key_end - it.key_begin) as usize))
                .sum()
        })
        .collect()
}

/// Checks that `p`'s items walk the segments in order, contiguously, never empty, each
/// within its segment (starting on a multiple of `align` keys), skipping only empty
/// segments; returns where the walk ended (segment, key) and the keys it covered.
fn walk_items(p: &AttnPlan, segs: &[Segment], lens: &[usize], align: i32) -> ((usize, i32), usize) {
    let mut at = (0usize, 0i32);
    let mut keys = 0;
    for it in &p.items {
        let s = segs.iter().position(|s| s.k == it.k).unwrap();
        assert_eq!(it.key_begin % align, 0);
        assert!(it.key_begin < it.key_end && it.key_end as usize <= lens[s]);
        if s == at.0 {
            assert_eq!(it.key_begin, at.1);
        } else {
            assert!(s > at.0 && it.key_begin == 0);
            assert_eq!(at.1 as usize, lens[at.0]);
            assert!(lens[at.0 + 1..s].iter().all(|&l| l == 0));
        }
        at = (s, it.key_end);
        keys += (it.key_end - it.key_begin) as usize;
    }
    (at, keys)
}

/// The balanced plan: `min(target, total / 16)` splits whose key counts differ by less
/// than 32 (cut points rounded down to multiples of 16 keys), items in key order, each within its segment,
/// every key covered once, empty segments skipped.
#[test]
fn balanced_plan_cuts_equal_splits_across_segments() {
    let lens = [8192usize, 0, 8192, 8192, 130, 1, 45];
    let segs = distinct_segments(&lens, 6);
    let total: usize = lens.iter().sum();
    for target in [1usize, 2, 3, 7, 16, 99, 112, 512, 5000] {
        let p = AttnPlan::new(&segs, target);
        let want = target.min(total / 16).max(1);
        assert_eq!(p.n_splits(), want, "target {target}");
        let sizes = split_sizes(&p, |keys| keys);
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(hi - lo < 32, "target {target}: {lo}..{hi}");
        assert_eq!(sizes.iter().sum::<usize>(), total);
        assert_eq!(walk_items(&p, &segs, &lens, 1), ((6, 45), total));
    }
}

/// The whole-tile plan: `min(target, tiles)` splits whose tile counts differ by at most
/// one, every item starting on a 64-key tile of its segment, every key covered once in
/// order.
#[test]
fn tile_plan_cuts_whole_tiles() {
    let lens = [8192usize, 0, 8192, 130, 1, 45];
    let segs = distinct_segments(&lens, 5);
    let tiles: usize = lens.iter().map(|l| l.div_ceil(64)).sum();
    let total: usize = lens.iter().sum();
    for target in [1usize, 2, 3, 7, 66, 176, 261, 262, 1000] {
        let p = AttnPlan::tiles(&segs, target);
        assert_eq!(p.n_splits(), target.min(tiles), "target {target}");
        let counts = split_sizes(&p, |keys| keys.div_ceil(64));
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1 && *lo >= 1, "target {target}: {lo}..{hi}");
        assert_eq!(counts.iter().sum::<usize>(), tiles);
        assert_eq!(walk_items(&p, &segs, &lens, 64), ((5, 45), total));
    }
}

struct Fake(usize);
impl TierValue for Fake {
    fn tier_bytes(&self) -> usize {
        self.0
    }
}

#[test]
fn tier_evicts_least_recently_used_within_budget() {
    let mut t: BlockTier<u32, Fake> = BlockTier::new(100);
    t.insert(1, Arc::new(Fake(40)));
    t.insert(2, Arc::new(Fake(40)));
    assert!(t.get(&1).is_some()); // 2 is now the least recently used
    t.insert(3, Arc::new(Fake(40)));
    assert!(t.contains(&1) && t.contains(&3) && !t.contains(&2));
    assert_eq!(t.used_bytes(), 80);
    assert_eq!(t.evictions, 1);
    // Too large for the budget: not kept, nothing evicted.
    t.insert(4, Arc::new(Fake(101)));
    assert!(!t.contains(&4));
    assert_eq!(t.len(), 2);
    // Re-inserting a key replaces its size.
    t.insert(1, Arc::new(Fake(10)));
    assert_eq!(t.used_bytes(), 50);
    assert!(t.get(&2).is_none());
    assert_eq!((t.hits, t.misses), (1, 1));
    // A block in use survives eviction from the tier.
    let held = t.get(&3).unwrap();
    t.insert(5, Arc::new(Fake(95)));
    assert!(!t.contains(&3));
    assert_eq!(held.tier_bytes(), 40);
    assert_eq!(t.remove(&5).map(|b| b.tier_bytes()), Some(95));
    assert_eq!(t.used_bytes(), 0);
}

/// Every kernel the launcher loads by name is defined in the source it is loaded from (as
/// a plain `extern "C"` kernel or through the `ATTN_PIPE_KERNEL`, `ATTN_KV8_KERNEL`,
/// `ATTN_KV8_FM_KERNEL` or `ATTN_SM90_KERNELS` macro, the last defining NAME and NAME_tma): a missing one
/// would only show at run time on a GPU. The shared header defines no kernel.
#[test]
fn kernel_sources_declare_every_kernel() {
    let sm90_names: Vec<&str> = kernels::SM90_CONFIGS
        .iter()
        .flat_map(|&(_, plain, tma, _)| [plain, tma])
        .collect();
    let sm90: (&str, &str, &str, &[&str]) = (
        "attention_sm90.cu",
        kernels::ATTN_COMMON_SOURCE,
        kernels::ATTENTION_SM90_SOURCE,
        &sm90_names,
    );
    for (file, _, source, names) in kernels::SOURCES.into_iter().chain([sm90]) {
        for name in names {
            assert!(
                source.contains(&format!("void {name}("))
                    || source.contains(&format!("void __launch_bounds__(128) {name}("))
                    || source.contains(&format!("void __launch_bounds__(32) {name}("))
                    || source.contains(&format!("void __launch_bounds__(GEMV_THREADS) {name}("))
                    || source.contains(&format!("ATTN_SM90_KERNELS({name},"))
                    || name.strip_suffix("_tma").is_some_and(|base| {
                        source.contains(&format!("ATTN_SM90_KERNELS({base},"))
                    })
                    || source.contains(&format!("ATTN_PIPE_KERNEL({name},"))
                    || source.contains(&format!("ATTN_KV8_KERNEL({name},"))
                    || source.contains(&format!("ATTN_KV8_FM_KERNEL({name},")),
                "{name} is not defined in {file}"
            );
        }
    }
    // Each Hopper configuration compiles alone (S9_ONLY) with its own tile size.
    for (only, plain, tma, keys) in kernels::SM90_CONFIGS {
        assert_eq!(tma, format!("{plain}_tma"));
        let block =
            format!("#if S9_ONLY == 0 || S9_ONLY == {only}\nATTN_SM90_KERNELS({plain}, {keys}, ");
        assert!(
            kernels::ATTENTION_SM90_SOURCE.contains(&block),
            "{plain} is not configuration {only} with {keys}-key tiles"
        );
    }
    assert!(!COMMON_SOURCE.contains("__global__"));
    assert!(!kernels::ATTN_COMMON_SOURCE.contains("__global__"));
    assert!(!ELEMENTWISE_SOURCE.contains("attn_"));
    assert!(!GEMV_SOURCE.contains("attn_"));
}

/// The body of the `__device__`/`__global__` function `name` in `source`: from its
/// definition to the first line that closes it at column 0.
fn function_body<'a>(source: &'a str, name: &str) -> &'a str {
    let at = source
        .find(&format!(" {name}("))
        .unwrap_or_else(|| panic!("{name} not found"));
    let body = &source[at..];
    &body[..body.find("\n}\n").unwrap_or(body.len())]
}

/// A kernel launched as a programmatic dependent must wait for the kernel before it
/// before it reads anything (a missing wait is a race that only shows, sometimes, on a
/// Hopper GPU): every kernel on the attention allow-list waits first or is built on a
/// body that does, as the split merge and every one-row product are.
#[test]
fn dependent_kernels_wait_for_their_predecessor() {
    let waits_first = |body: &str| {
        let wait = body.find("pdl_wait();").expect("calls pdl_wait");
        // Nothing is read from global memory before the wait: no `[` indexing a
        // pointer argument and no load helper ahead of it.
        let head = &body[..wait];
        assert!(
            !head.contains("ldg") && !head.contains("load_") && !head.contains("]="),
            "reads before pdl_wait: {head}"
        );
    };
    for body in ["attn_simple_body", "attn_pipe_body", "attn_merge"] {
        waits_first(function_body(ATTENTION_SOURCE, body));
    }
    for name in super::attention::WAIT_FOR_PREDECESSOR {
        // A kernel that waits in its own body (attn_fwd_swap) is checked like the bodies.
        if ATTENTION_SOURCE.contains(&format!(" {name}(")) {
            let own = function_body(ATTENTION_SOURCE, name);
            if own.contains("pdl_wait();") {
                waits_first(own);
                continue;
            }
        }
        let defined_on = |body: &str| {
            ATTENTION_SOURCE.contains(&format!("ATTN_PIPE_KERNEL({name},"))
                && body == "attn_pipe_body"
                || (ATTENTION_SOURCE.contains(&format!("ATTN_KV8_KERNEL({name},"))
                    || ATTENTION_SOURCE.contains(&format!("ATTN_KV8_FM_KERNEL({name},")))
                    && body == "attn_simple_body"
                || ATTENTION_SOURCE.contains(&format!(" {name}("))
                    && function_body(ATTENTION_SOURCE, name).contains(&format!("{body}<"))
        };
        assert!(
            defined_on("attn_simple_body") || defined_on("attn_pipe_body"),
            "{name} is launched as a dependent but is not built on a body that waits"
        );
    }
    waits_first(function_body(GEMV_SOURCE, "gemv_run"));
    for name in ["gemv_qkv_rope", "gemv_swiglu", "gemv_rows"] {
        assert!(
            function_body(GEMV_SOURCE, name).contains("gemv_run("),
            "{name} is launched as a dependent but is not built on gemv_run"
        );
    }
    // The macros' bodies call the waiting bodies.
    assert!(ATTENTION_SOURCE.contains("attn_pipe_body<NW, MT, TBN>("));
    assert!(ATTENTION_SOURCE.contains("attn_simple_body<NW, true, TBN>("));
    assert!(ATTENTION_SOURCE.contains("attn_simple_body<1, true, TBN, false, true>("));
}

/// Padding a plan for a captured decode graph adds empty splits only: the items and the
/// existing split ranges stay, and every added split starts and ends at the last item.
#[test]
fn padded_plans_keep_their_splits_and_add_empty_ones() {
    let seg = |len, causal_offset| Segment {
        k: 0x1000,
        v: 0x2000,
        head_stride: 64 * 1024,
        row_stride: 64,
        len,
        causal_offset,
        scale_off: 0,
        log2_weight: 0.0,
    };
    let plan = AttnPlan::new(&[seg(1000, None), seg(7, Some(6))], 4);
    let mut padded = plan.clone();
    padded.pad_splits(plan.n_splits() + 5);
    assert_eq!(padded.n_splits(), plan.n_splits() + 5);
    assert_eq!(padded.items.len(), plan.items.len());
    assert_eq!(
        &padded.split_begin[..plan.split_begin.len()],
        &plan.split_begin[..]
    );
    let last = *plan.split_begin.last().unwrap();
    assert!(
        padded.split_begin[plan.split_begin.len()..]
            .iter()
            .all(|&s| s == last)
    );
    // Never shrinks.
    let mut same = plan.clone();
    same.pad_splits(1);
    assert_eq!(same.split_begin, plan.split_begin);
}

/// A plan over an 8-bit segment is marked 8-bit (the launch picks the 8-bit kernels)
/// and every item cut from it carries its scales' offset; a 16-bit plan is not.
#[test]
fn plans_mark_8bit_segments() {
    let eight = Segment {
        scale_off: 4096,
        ..seg(1000, None)
    };
    let plan = AttnPlan::new(&[seg(50, Some(3)), eight], 4);
    assert!(plan.kv8());
    assert!(plan.items.iter().any(|i| i.scale_off == 4096));
    for it in &plan.items {
        assert!(it.scale_off == 0 || (it.scale_off == 4096 && it.causal_offset == -1));
    }
    assert!(!AttnPlan::new(&[seg(50, Some(3)), seg(1000, None)], 4).kv8());
}

/// The Hopper kernel runs only where it can: on a device without it, or at a head_dim
/// other than 128, the same choice launches the mma.sync kernel; and the launch asks for
/// the shared memory the kernel's layout needs.
#[test]
fn hopper_kernel_falls_back_off_hopper() {
    let on = AttnKernels {
        long: LongKernel::HopperV2,
        hopper: true,
        ..AttnKernels::default()
    };
    let off = AttnKernels {
        hopper: false,
        ..on
    };
    assert_eq!(on.launch(4096, 128, false).0, "attn_fwd_sm90_v2");
    assert_eq!(on.launch(4096, 128, false).1, 128);
    assert_eq!(on.launch(4096, 128, false).2, 384);
    assert_eq!(
        on.launch(4096, 128, false).3,
        super::attention::sm90_smem(128)
    );
    for (long, name, keys) in [
        (LongKernel::HopperPingPong, "attn_fwd_sm90_pp", 128),
        (LongKernel::HopperPingPong176, "attn_fwd_sm90_pp176", 176),
    ] {
        let k = AttnKernels { long, ..on };
        assert_eq!(k.launch(4096, 128, false).0, name);
        assert_eq!(long.hopper_keys(), keys);
        assert_eq!(
            k.launch(4096, 128, false).3,
            super::attention::sm90_smem(keys)
        );
        assert_eq!(k.launch(4096, 64, false).0, "attn_fwd_m32");
        assert_ne!(k.code(), on.code());
    }
    // The tiles and barriers fit the 227 KiB a block may have, at either tile size.
    assert!(super::attention::sm90_smem(176) <= 227 * 1024);
    assert_eq!(on.launch(4096, 64, false).0, "attn_fwd_m32");
    assert_eq!(off.launch(4096, 128, false).0, "attn_fwd_m32");
    // Short runs, decoding and 8-bit plans never take it.
    assert_eq!(on.launch(64, 128, false).0, "attn_fwd_simple");
    assert_eq!(on.launch(16, 128, false).0, "attn_fwd_w1");
    assert_eq!(on.launch(4096, 128, true).0, "attn_fwd_simple_kv8");
    let m32 = AttnKernels {
        long: LongKernel::M32,
        ..on
    };
    assert_ne!(on.code(), m32.code());
}

/// The fused merge's group size keeps both levels within one warp's 32 lanes (at most 32
/// splits a group, at most 32 groups) for every split count the launcher allows, whatever
/// size is asked for; by default about the square root of the split count.
#[test]
fn fused_merge_groups_fit_one_warp_per_level() {
    for asked in [0, 1, 2, 4, 9, 32, 33, 1000] {
        let tuning = super::SplitTuning {
            balanced: true,
            tile_cuts: false,
            wide_merge: true,
            merge_pdl: false,
            decode_per_sm: 0,
            fused_merge: true,
            merge_group: asked,
        };
        for n in 1..=1024usize {
            let g = tuning.fused_merge_group(n);
            assert!(
                (1..=32).contains(&g),
                "{n} splits, asked {asked}: group {g}"
            );
            assert!(n.div_ceil(g) <= 32, "{n} splits, asked {asked}: group {g}");
            if asked == 0 {
                assert!(g * g >= n && (g - 1) * (g - 1) < n, "{n} splits: group {g}");
            }
        }
    }
}

/// A weighted segment (APE's tempered group at T = 1 in the main plan) hands its weight
/// to every item cut from it, across split boundaries; unweighted segments stay at 0.
#[test]
fn plans_carry_segment_weights_to_every_item() {
    let w = 0.5f32.log2();
    let segs = [
        seg(300, None),
        seg(1000, None).weighted(w),
        seg(40, Some(3)),
    ];
    let plan = AttnPlan::new(&segs, 7);
    assert!(plan.n_splits() > 3);
    let weighted: usize = plan
        .items
        .iter()
        .filter(|i| i.k == segs[1].k)
        .map(|i| {
            assert_eq!(i.log2_weight, w);
            (i.key_end - i.key_begin) as usize
        })
        .sum();
    assert_eq!(weighted, 1000);
    assert!(
        plan.items
            .iter()
            .filter(|i| i.k != segs[1].k)
            .all(|i| i.log2_weight == 0.0)
    );
}

/// Only the kernels that read item weights get a weighted plan: the one-warp decode
/// kernels and the simple kernel (up to 64 rows), 16- or 8-bit; not the pipelined decode
/// alternative, nor the long kernels.
#[test]
fn weighted_plans_only_for_kernels_that_read_weights() {
    let k = AttnKernels {
        long: LongKernel::HopperV2,
        hopper: true,
        ..AttnKernels::default()
    };
    assert!(k.reads_weights(4, 128, false));
    assert!(k.reads_weights(64, 64, false));
    assert!(k.reads_weights(4, 128, true));
    assert!(k.reads_weights(4096, 128, true));
    assert!(!k.reads_weights(65, 128, false));
    assert!(!k.reads_weights(4096, 128, false));
    let pipelined = AttnKernels {
        decode: DecodeKernel::P1N32,
        ..k
    };
    assert!(!pipelined.reads_weights(4, 128, false));
}

/// Every CUDA source compiles with NVRTC, with the options the runtime passes, for
/// compute_80 (the oldest target) and compute_90, for both
/// 16-bit types at the head dimensions of the supported models (64: SmolLM2, 128:
/// Llama-3.1-8B), and every configuration of the Hopper kernel for compute_90a; the PTX
/// holds every kernel the runtime loads by name. No GPU needed: a broken kernel source
/// fails here, in CI, not on the lent GPU. `scripts/test` installs NVRTC (PyPI's
/// nvidia-cuda-nvrtc) and sets STARKV_REQUIRE_NVRTC=1, so the suite cannot pass without
/// compiling them; elsewhere the test compiles them when NVRTC is found.
#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    use super::kernels::{
        ATTENTION_SM90_SOURCE, ATTN_COMMON_SOURCE, SM90_CONFIGS, SOURCES, compile_options,
        compile_source,
    };
    // SAFETY: only probes whether the library can be loaded (as `probe` does).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert!(
            std::env::var_os("STARKV_REQUIRE_NVRTC").is_none(),
            "STARKV_REQUIRE_NVRTC is set, but libnvrtc was not found (LD_LIBRARY_PATH?)"
        );
        eprintln!(
            "NVRTC not found: the kernel sources were not compiled (scripts/test installs it)"
        );
        return;
    }
    let entries = |ptx: &cudarc::nvrtc::Ptx| {
        let src = ptx.to_src();
        move |name: &str| src.contains(&format!(".entry {name}("))
    };
    // The oldest architecture the runtime compiles for (compute_80: the fallbacks of
    // the sm_89+ conversions) and Hopper's.
    for arch in ["compute_80", "compute_90"] {
        for dtype in [HalfType::BF16, HalfType::F16] {
            for head_dim in [64, 128] {
                let options = compile_options(dtype, head_dim);
                for (file, shared, source, names) in SOURCES {
                    let ptx =
                        compile_source(file, shared, source, arch, &options).unwrap_or_else(|e| {
                            panic!("{file}, {arch}, {dtype:?}, head_dim {head_dim}: {e}")
                        });
                    let has = entries(&ptx);
                    for name in names {
                        assert!(
                            has(name),
                            "{name} missing from {file} ({arch}, {dtype:?}, {head_dim})"
                        );
                    }
                }
            }
        }
    }
    for (only, plain, tma, _) in SM90_CONFIGS {
        let mut options = compile_options(HalfType::BF16, 128);
        options.push(format!("-DS9_ONLY={only}"));
        let file = "attention_sm90.cu";
        let ptx = compile_source(
            file,
            ATTN_COMMON_SOURCE,
            ATTENTION_SM90_SOURCE,
            "compute_90a",
            &options,
        )
        .unwrap_or_else(|e| panic!("{file}, S9_ONLY={only}: {e}"));
        let has = entries(&ptx);
        assert!(
            has(plain) && has(tma),
            "{plain} / {tma} missing from {file}"
        );
    }
}
