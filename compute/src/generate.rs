//! The generation loop: prefill, then one token at a time until a stop condition.
//!
//! The loop is independent of what the tokens attend to (a [`LayerAttention`]): plain
//! causal attention with a [`crate::model::KvCache`], or Star Attention's phase 2 over
//! cached blocks; and of where the forward pass runs ([`generate_with`] takes any step
//! function, e.g. the GPU's).

use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::model::{LayerAttention, Llama};
use crate::sampling::{Sampler, SamplingParams, TokenLogprob, token_logprob};
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one of these; the stop string and what
    /// follows it are not part of the answer.
    pub stop: Vec<String>,
    /// Checked before every step (and on the CPU before every layer): once set, the
    /// prefill fails with [`Error::Cancelled`], and decoding stops with what it has
    /// ([`StopReason::Cancelled`]).
    pub cancel: Cancel,
    /// How phase 2 merges the context blocks' partial results (exact unless the document
    /// asks for APE's tempered merge, issue 14).
    pub merge: crate::partial::ContextMerge,
    /// Report every generated token's log-probability and this many most likely
    /// alternatives per step ([`crate::sampling::token_logprob`]); `None`: none.
    pub logprobs: Option<usize>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-generation token (EOS, `<|im_end|>`...).
    EndOfGeneration,
    StopString,
    MaxTokens,
    /// The token callback asked to stop, or [`GenerateParams::cancel`] was set after the
    /// first token (before it, generation fails with [`Error::Cancelled`]).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, including the end-of-generation token when there was one.
    pub ids: Vec<u32>,
    /// The answer text (no end-of-generation marker, cut before any stop string).
    pub text: String,
    pub stop_reason: StopReason,
    /// Time to process the prompt and produce the first token's logits.
    pub prefill: Duration,
    /// Time spent on the following tokens.
    pub decode: Duration,
    /// One per generated id when [`GenerateParams::logprobs`] asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// Generates after `prompt` (at positions `start_pos..`), sending each piece of answer
/// text to `on_text` as soon as it is final; `on_text` returns `false` to cancel.
///
/// The CPU forward pass through `attention`; [`generate_with`] is the same loop over any
/// forward pass (the GPU's).
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    start_pos: usize,
    attention: &mut dyn LayerAttention,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let h = model.config().hidden;
    let mut attention = Cancellable {
        inner: attention,
        cancel: &params.cancel,
    };
    let mut step = |tokens: &[u32], positions: &[usize]| -> Result<Vec<f32>> {
        let hidden = model.forward(tokens, positions, &mut attention)?;
        Ok(model.logits(&hidden[hidden.len() - h..]))
    };
    generate_with(&mut step, tokenizer, prompt, start_pos, params, on_text)
}

/// A [`LayerAttention`] that also tells the forward pass when `cancel` is set, so a long
/// prefill stops within one layer.
struct Cancellable<'a> {
    inner: &'a mut dyn LayerAttention,
    cancel: &'a Cancel,
}

impl LayerAttention for Cancellable<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.inner.attend(layer, q, k, v, m, out)
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn computes_only(&self) -> bool {
        self.inner.computes_only()
    }
}

/// One forward pass of new tokens at their positions, returning the last token's logits.
pub type Step<'a> = dyn FnMut(&[u32], &[usize]) -> Result<Vec<f32>> + 'a;

/// The generation loop over any forward pass: `step(tokens, positions)` runs the new
/// tokens through the model (keeping their KV wherever its attention keeps it) and
/// returns the logits of the LAST token. Called once with the whole prompt, then once per
/// generated token; `params.cancel` is checked before every call.
pub fn generate_with(
    step: &mut Step<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    start_pos: usize,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let positions = prompt_positions(prompt, start_pos, params)?;
    let started = Instant::now();
    let mut logits = step(prompt, &positions)?;
    let prefill = started.elapsed();
    let decode_started = Instant::now();
    let mut emitter = Emitter::new(tokenizer, params, on_text);
    let mut pos = start_pos + prompt.len();
    let stop_reason = loop {
        if emitter.ids.len() >= params.max_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample(&logits);
        if let Some(reason) = emitter.push(next, Some(&logits)) {
            break reason;
        }
        logits = match step(&[next], &[pos]) {
            Err(Error::Cancelled) => break StopReason::Cancelled,
            other => other?,
        };
        pos += 1;
    };
    Ok(emitter.finish(stop_reason, prefill, decode_started.elapsed()))
}

/// The prompt through the model, returning the first greedy token ([`generate_picked`]).
pub type PickedPrefill<'a> = dyn FnMut(&[u32], &[usize]) -> Result<u32> + 'a;

/// Up to `max_steps` greedy steps from `(first, position)`, each next token handed to the
/// callback, which returns false to stop ([`generate_picked`]).
pub type PickedDecode<'a> =
    dyn FnMut(u32, usize, usize, &mut dyn FnMut(u32) -> bool) -> Result<()> + 'a;

/// Greedy decoding whose tokens are picked where the forward pass runs (the GPU's
/// pipelined steps: [`crate::cuda::CudaLlama::decode_greedy_pipelined`]), so no logits
/// cross to the host: `prefill(prompt, positions)` returns the first token,
/// `decode(first, position, max_steps, on_token)` feeds it back and hands each next token
/// to `on_token`, which returns false to stop. The same tokens, text, stops and timings
/// as [`generate_with`] with greedy sampling, without log-probabilities (callers with
/// `params.logprobs` or a temperature above 0 use [`generate_with`]).
pub fn generate_picked(
    prefill: &mut PickedPrefill<'_>,
    decode: &mut PickedDecode<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    start_pos: usize,
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if params.sampling.temperature != 0.0 || params.logprobs.is_some() {
        return Err(Error::InvalidInput(
            "tokens picked on the device are greedy and carry no log-probabilities".into(),
        ));
    }
    let positions = prompt_positions(prompt, start_pos, params)?;
    let started = Instant::now();
    let first = prefill(prompt, &positions)?;
    let prefill_time = started.elapsed();
    let decode_started = Instant::now();
    let mut emitter = Emitter::new(tokenizer, params, on_text);
    let stop_reason = if params.max_tokens == 0 {
        StopReason::MaxTokens
    } else if let Some(reason) = emitter.push(first, None) {
        reason
    } else {
        let mut reason = None;
        let pos = start_pos + prompt.len();
        let steps = params.max_tokens - 1;
        let decoded = decode(first, pos, steps, &mut |next| {
            reason = emitter.push(next, None);
            reason.is_none()
        });
        match decoded {
            Err(Error::Cancelled) => StopReason::Cancelled,
            Err(e) => return Err(e),
            // Every step ran without a stop: the token budget is spent.
            Ok(()) => reason.unwrap_or(StopReason::MaxTokens),
        }
    };
    Ok(emitter.finish(stop_reason, prefill_time, decode_started.elapsed()))
}

/// The prompt's positions `start_pos..`, once it is known not to be empty and the
/// generation not cancelled: what both loops check before their prefill.
fn prompt_positions(
    prompt: &[u32],
    start_pos: usize,
    params: &GenerateParams,
) -> Result<Vec<usize>> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt is empty".into()));
    }
    params.cancel.check()?;
    Ok((start_pos..start_pos + prompt.len()).collect())
}

/// The per-token half of the generation loop, shared by [`generate_with`] (tokens
/// sampled from logits on the host) and [`generate_picked`] (tokens picked on the
/// device): records each token, streams its final text and says when to stop.
struct Emitter<'a> {
    tokenizer: &'a Tokenizer,
    params: &'a GenerateParams,
    on_text: &'a mut dyn FnMut(&str) -> bool,
    stream: TextStream<'a>,
    ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
}

impl<'a> Emitter<'a> {
    fn new(
        tokenizer: &'a Tokenizer,
        params: &'a GenerateParams,
        on_text: &'a mut dyn FnMut(&str) -> bool,
    ) -> Self {
        Self {
            tokenizer,
            params,
            on_text,
            stream: TextStream::new(&params.stop),
            ids: Vec::new(),
            logprobs: Vec::new(),
        }
    }

    /// Takes the next token (with its step's logits when log-probabilities are asked
    /// for); `Some(reason)` when the generation ends with it.
    fn push(&mut self, next: u32, logits: Option<&[f32]>) -> Option<StopReason> {
        self.ids.push(next);
        if let (Some(top), Some(logits)) = (self.params.logprobs, logits) {
            self.logprobs.push(token_logprob(logits, next, top));
        }
        if self.tokenizer.is_end_of_generation(next) {
            return Some(StopReason::EndOfGeneration);
        }
        let (piece, stopped) = self.stream.push(self.tokenizer.token_bytes(next));
        if !piece.is_empty() && !(self.on_text)(&piece) {
            return Some(StopReason::Cancelled);
        }
        if stopped {
            return Some(StopReason::StopString);
        }
        if self.ids.len() >= self.params.max_tokens {
            return Some(StopReason::MaxTokens);
        }
        // Cancelled after tokens were generated: the answer so far, marked as cancelled.
        if self.params.cancel.is_cancelled() {
            return Some(StopReason::Cancelled);
        }
        None
    }

    fn finish(
        mut self,
        stop_reason: StopReason,
        prefill: Duration,
        decode: Duration,
    ) -> Generation {
        let tail = self.stream.finish(stop_reason == StopReason::StopString);
        if !tail.is_empty() {
            (self.on_text)(&tail);
        }
        Generation {
            ids: self.ids,
            text: self.stream.text,
            stop_reason,
            prefill,
            decode,
            logprobs: self.logprobs,
        }
    }
}

/// Turns token bytes into final text: holds back incomplete UTF-8 characters and any
/// tail that could still grow into a stop string.
struct TextStream<'a> {
    stops: &'a [String],
    bytes: Vec<u8>,
    /// Text already handed out.
    text: String,
    stopped: bool,
}

impl<'a> TextStream<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            bytes: Vec::new(),
            text: String::new(),
            stopped: false,
        }
    }

    /// Adds a token's bytes; returns newly final text and whether a stop string appeared.
    fn push(&mut self, token: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(token);
        let valid = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        let pending = std::str::from_utf8(&self.bytes[..valid]).unwrap_or_default();
        let candidate = format!("{}{}", self.text, pending);
        if let Some(cut) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| candidate.find(s.as_str()))
            .min()
        {
            let piece = candidate[self.text.len().min(cut)..cut].to_string();
            self.text = candidate[..cut].to_string();
            self.bytes.clear();
            self.stopped = true;
            return (piece, true);
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| candidate.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let safe = (candidate.len() - hold).max(self.text.len());
        let piece = candidate[self.text.len()..safe].to_string();
        self.text.push_str(&piece);
        let consumed = safe - (candidate.len() - pending.len());
        self.bytes.drain(..consumed);
        (piece, false)
    }

    /// Releases held-back text at the end (lossily, for a cut-off character).
    fn finish(&mut self, stopped: bool) -> String {
        if stopped || self.stopped {
            return String::new();
        }
        let rest = String::from_utf8_lossy(&self.bytes).into_owned();
        self.bytes.clear();
        self.text.push_str(&rest);
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&[u8]], stops: &[&str]) -> (String, Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut stream = TextStream::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (piece, s) = stream.push(p);
            if !piece.is_empty() {
                out.push(piece);
            }
            if s {
                stopped = true;
                break;
            }
        }
        let tail = stream.finish(stopped);
        if !tail.is_empty() {
            out.push(tail);
        }
        (stream.text, out, stopped)
    }

    /// `generate_picked` (tokens picked where the forward pass runs) gives what
    /// `generate_with` gives with greedy sampling of the same tokens: ids, text, streamed
    /// pieces and stop reason, for token budgets, stop strings and a client hanging up.
    #[test]
    fn picked_tokens_generate_what_sampled_ones_do() {
        let names: Vec<String> = (0..40).map(|i| format!("t{i}.")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let tokenizer =
            Tokenizer::new(&names, &[], &vec![1i64; 40], "default", None, None, None).unwrap();
        let script: Vec<u32> = (0..30).map(|i| (i * 7 + 3) % 40).collect();
        let one_hot = |t: u32| {
            let mut l = vec![0f32; 40];
            l[t as usize] = 1.0;
            l
        };
        for (max_tokens, stop, hang_up_after) in [
            (0, None, usize::MAX),
            (1, None, usize::MAX),
            (6, None, usize::MAX),
            (30, Some("t24."), usize::MAX),
            (30, Some("t2"), usize::MAX),
            (30, None, 4),
        ] {
            let params = GenerateParams {
                max_tokens,
                sampling: SamplingParams::greedy(),
                stop: stop.map(String::from).into_iter().collect(),
                cancel: Default::default(),
                merge: Default::default(),
                logprobs: None,
            };
            let run = |picked: bool| {
                let mut pieces = Vec::new();
                let mut on_text = |p: &str| {
                    pieces.push(p.to_string());
                    pieces.len() < hang_up_after
                };
                let g = if picked {
                    let mut prefill = |_: &[u32], _: &[usize]| Ok(script[0]);
                    let mut decode =
                        |first: u32, pos: usize, steps: usize, on: &mut dyn FnMut(u32) -> bool| {
                            assert_eq!((first, pos), (script[0], 12));
                            for &t in &script[1..=steps] {
                                if !on(t) {
                                    break;
                                }
                            }
                            Ok(())
                        };
                    generate_picked(
                        &mut prefill,
                        &mut decode,
                        &tokenizer,
                        &[1, 2],
                        10,
                        &params,
                        &mut on_text,
                    )
                } else {
                    let mut calls = 0;
                    let mut step = |_: &[u32], _: &[usize]| {
                        calls += 1;
                        Ok(one_hot(script[calls - 1]))
                    };
                    generate_with(&mut step, &tokenizer, &[1, 2], 10, &params, &mut on_text)
                }
                .unwrap();
                (g.ids, g.text, g.stop_reason, pieces)
            };
            let (sampled, picked) = (run(false), run(true));
            assert_eq!(sampled, picked, "max_tokens {max_tokens}, stop {stop:?}");
            assert!(sampled.0.len() <= max_tokens);
        }
    }

    #[test]
    fn split_utf8_characters_are_held_until_complete() {
        let e_acute = "é".as_bytes();
        let (text, pieces, _) = run(&[b"caf", &e_acute[..1], &e_acute[1..], b"!"], &[]);
        assert_eq!(text, "café!");
        assert_eq!(pieces.concat(), "café!");
        assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')));
    }

    #[test]
    fn stop_strings_cut_the_answer_even_across_tokens() {
        let (text, pieces, stopped) = run(
            &[b"The answer", b" is 4", b"2.\n\nQ", b"uestion: next"],
            &["\n\nQuestion:"],
        );
        assert!(stopped);
        assert_eq!(text, "The answer is 42.");
        assert_eq!(pieces.concat(), text, "streamed text equals the final text");
    }

    #[test]
    fn a_held_prefix_that_does_not_complete_is_released() {
        let (text, _, stopped) = run(&[b"a\n", b"b"], &["\n\n"]);
        assert!(!stopped);
        assert_eq!(text, "a\nb");
    }
}
