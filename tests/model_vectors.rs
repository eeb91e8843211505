//! The default model against llama.cpp's reference vectors (tests/fixtures/llama_cpp,
//! copied from shared/vectors; see its README for how they were made).

use starkv_compute::generate::{GenerateParams, generate};
use starkv_compute::model::KvCache;
use starkv_compute::sampling::{SamplingParams, argmax, log_prob};

use crate::util::{fixture, model, u32s};

/// Every tokenizer case, with and without special-token parsing, gives llama.cpp's ids.
#[test]
fn tokenizer_reproduces_llama_cpp_ids() {
    let vectors = fixture("llama_cpp/tokenizer.json");
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 36);
    let tk = &model().tokenizer;
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case["parse_special"].as_bool().unwrap();
        let want = u32s(&case["ids"]);
        let got = tk.encode(text, special).unwrap();
        if got != want {
            failures.push(format!("{}: got {got:?}, want {want:?}", case["name"]));
        }
        if case["roundtrip_ok"].as_bool() == Some(true) {
            assert_eq!(
                tk.decode(&got),
                text,
                "{} does not round-trip",
                case["name"]
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} tokenizer mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

struct Agreement {
    mean_nll_diff: f64,
    mean_abs_logprob_diff: f64,
    argmax_agreement: f64,
}

fn compare_logits(name: &str) -> Agreement {
    let v = fixture(&format!("llama_cpp/logits_{name}.json"));
    let ids = u32s(&v["input_ids"]);
    let want_lp: Vec<f64> = v["target_logprob"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want_argmax = u32s(&v["argmax"]);
    let loaded = model();
    let m = &loaded.model;
    let mut cache = KvCache::new(m.config().n_layers, m.head_shape(), ids.len());
    let positions: Vec<usize> = (0..ids.len()).collect();
    let hidden = m.forward(&ids, &positions, &mut cache).unwrap();
    let (h, vocab) = (m.config().hidden, m.config().vocab);
    let (mut lp, mut am) = (Vec::new(), Vec::new());
    for start in (0..ids.len()).step_by(256) {
        let end = (start + 256).min(ids.len());
        let logits = m.logits(&hidden[start * h..end * h]);
        for (row, i) in logits.chunks_exact(vocab).zip(start..end) {
            am.push(argmax(row));
            if i + 1 < ids.len() {
                lp.push(log_prob(row, ids[i + 1]));
            }
        }
    }
    let n = lp.len() as f64;
    let nll = |x: &[f64]| -x.iter().sum::<f64>() / x.len() as f64;
    Agreement {
        mean_nll_diff: (nll(&lp) - nll(&want_lp)).abs(),
        mean_abs_logprob_diff: lp
            .iter()
            .zip(&want_lp)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / n,
        argmax_agreement: am.iter().zip(&want_argmax).filter(|(a, b)| a == b).count() as f64
            / am.len() as f64,
    }
}

/// Tolerances from the issue: llama.cpp quantises activations inside its dot products,
/// so an exact f32 forward pass differs measurably; judge by likelihood and argmax.
fn check_logits(name: &str) {
    let a = compare_logits(name);
    eprintln!(
        "{name}: |dNLL| {:.4}, mean |d logprob| {:.4}, argmax agreement {:.3}",
        a.mean_nll_diff, a.mean_abs_logprob_diff, a.argmax_agreement
    );
    assert!(
        a.mean_nll_diff < 0.02,
        "{name}: mean NLL differs by {}",
        a.mean_nll_diff
    );
    assert!(
        a.mean_abs_logprob_diff < 0.1,
        "{name}: mean |d logprob| {}",
        a.mean_abs_logprob_diff
    );
    assert!(
        a.argmax_agreement >= 0.94,
        "{name}: argmax agreement {}",
        a.argmax_agreement
    );
}

#[test]
fn logits_short_agree_with_llama_cpp() {
    check_logits("short");
}

#[test]
fn logits_medium_agree_with_llama_cpp() {
    check_logits("medium");
}

#[test]
fn logits_long_agree_with_llama_cpp() {
    check_logits("long");
}

/// Greedy continuations equal llama.cpp's up to the first near-tie (top-1 margin < 1.0),
/// where other float arithmetic may legitimately pick the other token.
#[test]
fn greedy_continuations_match_llama_cpp_until_a_near_tie() {
    let vectors = fixture("llama_cpp/greedy.json");
    let loaded = model();
    let m = &loaded.model;
    for case in vectors["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let prompt_ids = loaded.tokenizer.encode(prompt, true).unwrap();
        assert_eq!(prompt_ids, u32s(&case["prompt_ids"]), "{name}: prompt ids");
        let want = u32s(&case["greedy_ids"]);
        let margins: Vec<f64> = case["top1_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let checked = margins
            .iter()
            .position(|&mg| mg < 1.0)
            .unwrap_or(want.len());
        let params = GenerateParams {
            max_tokens: want.len(),
            sampling: SamplingParams::greedy(),
            stop: vec![],
            cancel: Default::default(),
            merge: Default::default(),
            logprobs: None,
        };
        let mut cache = KvCache::new(m.config().n_layers, m.head_shape(), 128);
        let got = generate(
            m,
            &loaded.tokenizer,
            &prompt_ids,
            0,
            &mut cache,
            &params,
            &mut |_| true,
        )
        .unwrap();
        // Steps before the first near-tie must match, and the near-tie step itself must
        // pick one of the two top tokens of llama.cpp (it may flip, nothing else).
        assert!(
            got.ids.len() >= checked,
            "{name}: stopped early: {:?}",
            got.ids
        );
        assert_eq!(
            got.ids[..checked],
            want[..checked],
            "{name}: greedy ids before the first near-tie (step {checked})"
        );
        eprintln!(
            "{name}: {checked}/{} steps checked before the first near-tie",
            want.len()
        );
    }
}

/// Teacher-forced along llama.cpp's greedy continuation: at every step whose top-1 margin
/// is at least 1.0 logit, our argmax is llama.cpp's token, including steps after a near-tie.
#[test]
fn greedy_argmax_matches_llama_cpp_at_every_clear_step() {
    let vectors = fixture("llama_cpp/greedy.json");
    let loaded = model();
    let m = &loaded.model;
    let mut checked = 0;
    for case in vectors["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut ids = u32s(&case["prompt_ids"]);
        let prompt_len = ids.len();
        let want = u32s(&case["greedy_ids"]);
        ids.extend(&want);
        let margins: Vec<f64> = case["top1_margin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let mut cache = KvCache::new(m.config().n_layers, m.head_shape(), ids.len());
        let positions: Vec<usize> = (0..ids.len()).collect();
        let hidden = m.forward(&ids, &positions, &mut cache).unwrap();
        let h = m.config().hidden;
        let logits = m.logits(&hidden[(prompt_len - 1) * h..(ids.len() - 1) * h]);
        for (step, row) in logits.chunks_exact(m.config().vocab).enumerate() {
            if margins[step] >= 1.0 {
                assert_eq!(
                    argmax(row),
                    want[step],
                    "{name}: step {step} (margin {})",
                    margins[step]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 50, "only {checked} clear steps checked");
}
