//! Byte-level BPE tokenizer built from a GGUF file's vocabulary and merges, with the
//! model's pre-tokenizer, its special tokens and the ChatML chat template.
//!
//! The BPE itself is Hugging Face's `tokenizers` (pure-Rust build); what this module owns
//! is reproducing llama.cpp's configuration for each `tokenizer.ggml.pre` value, and exact
//! byte-level decoding (each token maps back to its raw bytes, so a streamed answer never
//! splits a UTF-8 character).

use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer.
pub struct Tokenizer {
    /// Parses `<|im_start|>`-style markers as special tokens.
    with_special: HfTokenizer,
    /// Treats every character as text.
    plain: HfTokenizer,
    token_bytes: Vec<Vec<u8>>,
    end_of_generation: Vec<u32>,
    bos: Option<u32>,
    chat: Option<ChatTemplate>,
    fingerprint: [u8; 32],
}

impl Tokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let kind = file.get_str("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            return Err(Error::Unsupported(format!(
                "tokenizer model `{kind}` (byte-level BPE `gpt2` only)"
            )));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let merges = file.get_str_array("tokenizer.ggml.merges")?;
        let types = match file.get("tokenizer.ggml.token_type") {
            Some(_) => file.get_i64_array("tokenizer.ggml.token_type")?,
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::Tokenizer(
                "token_type and tokens differ in length".into(),
            ));
        }
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let bos = file
            .get("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let eos = file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let template = file.get("tokenizer.chat_template").and_then(|v| v.as_str());
        Self::new(&tokens, &merges, &types, pre, bos, eos, template)
    }

    /// Builds the tokenizer from the raw GGUF vocabulary.
    pub fn new(
        tokens: &[&str],
        merges: &[&str],
        types: &[i64],
        pre: &str,
        bos: Option<u32>,
        eos: Option<u32>,
        chat_template: Option<&str>,
    ) -> Result<Self> {
        let tk_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer(e.to_string());
        let build = |with_special: bool| -> Result<HfTokenizer> {
            let vocab: Vocab = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), i as u32))
                .collect();
            let merges = merges
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| Error::Tokenizer(format!("malformed merge `{m}`")))
                })
                .collect::<Result<Vec<_>>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(false)
                .build()
                .map_err(tk_err)?;
            let mut tk = HfTokenizer::new(bpe);
            let byte_level = ByteLevel::new(false, true, true);
            match pre {
                "smollm" => {
                    tk.with_pre_tokenizer(Some(Sequence::new(vec![
                        Digits::new(true).into(),
                        byte_level.into(),
                    ])));
                }
                "default" | "gpt2" | "gpt-2" => {
                    tk.with_pre_tokenizer(Some(byte_level));
                }
                "llama-bpe" | "llama3" => {
                    let split = Split::new(
                        SplitPattern::Regex(LLAMA3_PATTERN.into()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tk_err)?;
                    tk.with_pre_tokenizer(Some(Sequence::new(vec![
                        split.into(),
                        ByteLevel::new(false, true, false).into(),
                    ])));
                }
                other => return Err(Error::Unsupported(format!("pre-tokenizer `{other}`"))),
            }
            tk.with_decoder(Some(ByteLevelDecoder::default()));
            if with_special {
                let specials = tokens
                    .iter()
                    .zip(types)
                    .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
                    .map(|(s, _)| AddedToken::from(s.to_string(), true));
                tk.add_special_tokens(specials.collect::<Vec<_>>())
                    .map_err(tk_err)?;
            }
            Ok(tk)
        };
        let byte_of = byte_decoder();
        let token_bytes = tokens
            .iter()
            .zip(types)
            .map(|(t, ty)| match *ty {
                TOKEN_TYPE_NORMAL => t.chars().map(|c| byte_of(c).unwrap_or(b'?')).collect(),
                _ => t.as_bytes().to_vec(),
            })
            .collect();
        let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
        for (i, (t, ty)) in tokens.iter().zip(types).enumerate() {
            let is_eog_name = matches!(
                *t,
                "<|im_end|>" | "<|endoftext|>" | "<|eot_id|>" | "<|end_of_text|>" | "</s>"
            );
            if *ty == TOKEN_TYPE_CONTROL && is_eog_name && !end_of_generation.contains(&(i as u32))
            {
                end_of_generation.push(i as u32);
            }
        }
        let mut hasher = Sha256::new();
        hasher.update(pre.as_bytes());
        for (t, ty) in tokens.iter().zip(types) {
            hasher.update((t.len() as u64).to_le_bytes());
            hasher.update(t.as_bytes());
            hasher.update(ty.to_le_bytes());
        }
        for m in merges {
            hasher.update((m.len() as u64).to_le_bytes());
            hasher.update(m.as_bytes());
        }
        Ok(Self {
            with_special: build(true)?,
            plain: build(false)?,
            token_bytes,
            end_of_generation,
            bos,
            chat: chat_template.and_then(ChatTemplate::detect),
            fingerprint: hasher.finalize().into(),
        })
    }

    /// Token ids for `text` (no BOS is added). With `parse_special`, control-token
    /// markers such as `<|im_start|>` become their ids; otherwise they are plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special {
            &self.with_special
        } else {
            &self.plain
        };
        let encoding = tk
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The raw bytes a token stands for (control tokens: their marker text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Decodes ids to text, replacing invalid UTF-8 (e.g. a cut-off character) with U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether generation stops at `id` (EOS, `<|im_end|>`, `<|endoftext|>` and kin).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// SHA-256 over the pre-tokenizer name, vocabulary, token types and merges: two
    /// tokenizers with the same fingerprint produce the same ids.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }
}

/// GPT-2's byte-to-unicode table, inverted: which byte a vocabulary character encodes.
fn byte_decoder() -> impl Fn(char) -> Option<u8> {
    let mut table = [0u8; 324];
    let mut filled = [false; 324];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256u32;
    for b in 0u32..256 {
        let c = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[c as usize] = b as u8;
        filled[c as usize] = true;
    }
    move |c: char| {
        let i = c as usize;
        (i < table.len() && filled[i]).then(|| table[i])
    }
}

/// The ChatML chat template (`<|im_start|>role\ncontent<|im_end|>\n`), as used by SmolLM2,
/// Qwen and others; detected from the GGUF template text rather than by running Jinja.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// The system message the template inserts when the conversation has none.
    default_system: Option<String>,
}

impl ChatTemplate {
    fn detect(template: &str) -> Option<Self> {
        if !template.contains("<|im_start|>") {
            return None;
        }
        let marker = "<|im_start|>system\n";
        let default_system = template.find(marker).and_then(|start| {
            let rest = &template[start + marker.len()..];
            rest.find("<|im_end|>").map(|end| rest[..end].to_string())
        });
        Some(Self { default_system })
    }

    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// A one-turn conversation up to the assistant header, split around the user message:
    /// `(head, tail)` with `prompt = head + user + tail`. Star Attention puts the head and
    /// the document in the context and the question plus the tail in the query.
    pub fn user_turn(&self, system: Option<&str>) -> (String, String) {
        let mut head = String::new();
        if let Some(system) = system.or(self.default_system.as_deref()) {
            head.push_str(&format!("<|im_start|>system\n{system}<|im_end|>\n"));
        }
        head.push_str("<|im_start|>user\n");
        (head, "<|im_end|>\n<|im_start|>assistant\n".to_string())
    }

    /// The full prompt for one user message.
    pub fn render(&self, system: Option<&str>, user: &str) -> String {
        let (head, tail) = self.user_turn(system);
        format!("{head}{user}{tail}")
    }
}
