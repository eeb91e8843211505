//! A deterministic needle-in-a-haystack generator (RULER-style "niah_single",
//! "niah_multikey" and "niah_multivalue" with 7-digit values).
//!
//! Why our own haystack: the usual Paul Graham essays are not ours to ship, and a
//! generator lets every case be rebuilt bit-for-bit from `(seed, length, depth)`. The
//! filler is natural English produced from sentence templates and word lists with a
//! seeded splitmix64, so it reads like prose (which matters: a haystack of random words
//! is far easier to search than text that looks like the needle's surroundings), yet
//! contains no digits at all, so the only 7-digit numbers in a document are the needles.
//!
//! The generator knows nothing about models: it measures text with a token-counting
//! closure, so the caller decides what "1024 tokens" means (the real tokenizer).

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast and good enough to pick words;
/// implemented here so the benchmark does not depend on a particular `rand` version's
/// stream, which would silently change every case after an upgrade.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is irrelevant for word lists.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
        words[self.below(words.len())]
    }
}

/// Mixes several integers into one seed, so that a case's seed depends only on its own
/// coordinates (length, depth, task) and not on which other cases a run asks for.
pub fn seed_of(parts: &[u64]) -> u64 {
    let mut rng = SplitMix64::new(0x5EED_57A2_u64);
    for &p in parts {
        rng = SplitMix64::new(rng.next_u64() ^ p);
    }
    rng.next_u64()
}

const NAMES: &[&str] = &[
    "Marta",
    "Julian",
    "the old ferryman",
    "my grandmother",
    "the baker",
    "Tomas",
    "the young teacher",
    "Elena",
    "a retired sailor",
    "the librarian",
    "Owen",
    "Priya",
    "the mayor",
    "her brother",
    "the night nurse",
    "Ines",
    "the postman",
    "Samuel",
    "a travelling musician",
    "the shopkeeper",
    "Nadia",
    "the gardener",
    "Felix",
    "the village doctor",
];
const PLACES: &[&str] = &[
    "the harbour",
    "the market square",
    "the edge of the forest",
    "the train station",
    "the narrow bridge",
    "the orchard",
    "the lighthouse",
    "the public library",
    "the top of the hill",
    "the riverbank",
    "the empty theatre",
    "the bakery on the corner",
    "the stone chapel",
    "the greenhouse",
    "the museum steps",
    "the old mill",
    "the quiet courtyard",
    "the ferry landing",
];
const TIMES: &[&str] = &[
    "Early in the morning",
    "Late that autumn",
    "On the first warm day of spring",
    "Just before sunset",
    "During the long winter",
    "After the storm had passed",
    "On most Sundays",
    "In the middle of the night",
    "Every year around harvest time",
    "Long before anyone could remember",
    "By the end of the summer",
    "One rainy afternoon",
];
const PAST_VERBS: &[&str] = &[
    "carried",
    "painted",
    "repaired",
    "forgot",
    "found",
    "sold",
    "borrowed",
    "measured",
    "wrapped",
    "described",
    "polished",
    "hid",
    "collected",
    "studied",
    "returned",
    "photographed",
    "sketched",
    "mended",
];
const THINGS: &[&str] = &[
    "a wooden chair",
    "an old map",
    "a basket of pears",
    "a broken lantern",
    "a letter from abroad",
    "a pair of boots",
    "a jar of honey",
    "a faded photograph",
    "a set of brass keys",
    "a wool blanket",
    "a box of seeds",
    "a violin case",
    "a small clock",
    "a stack of newspapers",
    "a blue umbrella",
    "a copper kettle",
    "a bundle of firewood",
    "a straw hat",
];
const ADJECTIVES: &[&str] = &[
    "strange",
    "quiet",
    "remarkable",
    "ordinary",
    "curious",
    "gentle",
    "stubborn",
    "surprising",
    "pleasant",
    "peculiar",
    "familiar",
    "fragile",
    "patient",
    "careless",
];
const ABSTRACTS: &[&str] = &[
    "patience",
    "kindness",
    "good bread",
    "a clear sky",
    "honest work",
    "an early start",
    "a long walk",
    "silence",
    "a well-kept garden",
    "old friendship",
    "curiosity",
    "a warm kitchen",
    "careful planning",
    "a good story",
];
const PLURALS: &[&str] = &[
    "the children",
    "the fishermen",
    "the neighbours",
    "the students",
    "the farmers",
    "the visitors",
    "the musicians",
    "the cats",
    "the birds",
    "the travellers",
    "the painters",
    "the shop owners",
];
const PRESENT_VERBS: &[&str] = &[
    "gather",
    "argue",
    "sing",
    "wait",
    "laugh",
    "whisper",
    "disappear",
    "wander",
    "complain",
    "celebrate",
    "listen",
    "hurry",
];
const WEATHER: &[&str] = &[
    "the wind turned cold",
    "the fog rolled in from the sea",
    "the rain finally stopped",
    "the snow began to melt",
    "the clouds broke apart",
    "the air smelled of salt",
    "the light grew soft and golden",
    "the streets fell silent",
];
const SMELLS: &[&str] = &[
    "cinnamon",
    "pine resin",
    "wet stone",
    "old paper",
    "fresh coffee",
    "lavender",
    "woodsmoke",
    "sea salt",
    "oranges",
    "linseed oil",
];

/// One natural-sounding filler sentence.
fn filler_sentence(rng: &mut SplitMix64) -> String {
    let cap = |s: &str| {
        let mut c = s.chars();
        c.next()
            .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
    };
    match rng.below(14) {
        0 => format!(
            "{}, {} {} {} near {}.",
            rng.pick(TIMES),
            rng.pick(NAMES),
            rng.pick(PAST_VERBS),
            rng.pick(THINGS),
            rng.pick(PLACES)
        ),
        1 => format!(
            "{} had always believed that {} mattered more than {}.",
            cap(rng.pick(NAMES)),
            rng.pick(ABSTRACTS),
            rng.pick(ABSTRACTS)
        ),
        2 => format!(
            "It is {} how often {} {} when {}.",
            rng.pick(ADJECTIVES),
            rng.pick(PLURALS),
            rng.pick(PRESENT_VERBS),
            rng.pick(WEATHER)
        ),
        3 => format!(
            "By the time {} reached {}, {}.",
            rng.pick(NAMES),
            rng.pick(PLACES),
            rng.pick(WEATHER)
        ),
        4 => format!(
            "{} kept {} in a drawer, and the whole room smelled faintly of {}.",
            cap(rng.pick(NAMES)),
            rng.pick(THINGS),
            rng.pick(SMELLS)
        ),
        5 => format!(
            "Nobody near {} could explain why {} would {} there every evening.",
            rng.pick(PLACES),
            rng.pick(PLURALS),
            rng.pick(PRESENT_VERBS)
        ),
        6 => format!(
            "There was something {} about the way {} {} {}.",
            rng.pick(ADJECTIVES),
            rng.pick(NAMES),
            rng.pick(PAST_VERBS),
            rng.pick(THINGS)
        ),
        7 => format!(
            "{} said that {} is easy to praise and hard to practise.",
            cap(rng.pick(NAMES)),
            rng.pick(ABSTRACTS)
        ),
        8 => format!(
            "{} {} and {} went to look for {} at {}.",
            rng.pick(TIMES),
            rng.pick(WEATHER),
            rng.pick(NAMES),
            rng.pick(THINGS),
            rng.pick(PLACES)
        ),
        9 => format!(
            "Most of {} preferred {} to {}, although few of them would admit it.",
            rng.pick(PLURALS),
            rng.pick(ABSTRACTS),
            rng.pick(ABSTRACTS)
        ),
        10 => format!(
            "The path to {} was {} in those days, and {} rarely took it alone.",
            rng.pick(PLACES),
            rng.pick(ADJECTIVES),
            rng.pick(NAMES)
        ),
        11 => format!(
            "When {} {} {}, {} began to {}.",
            rng.pick(NAMES),
            rng.pick(PAST_VERBS),
            rng.pick(THINGS),
            rng.pick(PLURALS),
            rng.pick(PRESENT_VERBS)
        ),
        12 => format!(
            "A {} silence settled over {} while {}.",
            rng.pick(ADJECTIVES),
            rng.pick(PLACES),
            rng.pick(WEATHER)
        ),
        _ => format!(
            "Years later, {} still talked about {} and the smell of {}.",
            rng.pick(NAMES),
            rng.pick(THINGS),
            rng.pick(SMELLS)
        ),
    }
}

const KEY_ADJECTIVES: &[&str] = &[
    "amber", "silent", "crimson", "hollow", "golden", "frozen", "velvet", "rusty", "bright",
    "distant", "wild", "gentle", "ancient", "hidden", "electric", "silver",
];
const KEY_NOUNS: &[&str] = &[
    "falcon", "harbor", "lantern", "meadow", "compass", "glacier", "orchid", "anvil", "canyon",
    "violin", "beacon", "thimble", "walrus", "quarry", "saddle", "comet",
];

/// The task kinds of the benchmark (also the benches' `--tasks` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Task {
    /// One needle; the question asks for it.
    Single,
    /// 3 or 4 needles with different keys; each question asks for one of them.
    #[value(name = "multikey")]
    MultiKey,
    /// 4 needles with the same key and different values; one question asks for all of
    /// them and is right only when the answer holds every value.
    #[value(name = "multivalue")]
    MultiValue,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Single => "single",
            Task::MultiKey => "multikey",
            Task::MultiValue => "multivalue",
        }
    }
}

/// One needle: "The special magic number for {key} is {number}."
#[derive(Debug, Clone)]
pub struct Needle {
    /// Whether the key has several values ("One of the special magic numbers ...").
    pub one_of_many: bool,
    pub key: String,
    /// Always 7 digits (1000000..=9999999).
    pub number: String,
    /// Relative position in the haystack, 0.0 (start) ..= 1.0 (end).
    pub depth: f64,
}

impl Needle {
    pub fn sentence(&self) -> String {
        if self.one_of_many {
            return format!(
                "One of the special magic numbers for {} is {}.",
                self.key, self.number
            );
        }
        format!(
            "The special magic number for {} is {}.",
            self.key, self.number
        )
    }

    /// The question asked about this needle. It names the key only, like RULER's.
    pub fn question(&self) -> String {
        format!(
            "What is the special magic number for {} mentioned in the provided text?",
            self.key
        )
    }
}

/// One question about a case and the numbers a correct answer holds (all of them).
#[derive(Debug, Clone)]
pub struct Question {
    pub text: String,
    pub expected: Vec<String>,
    /// Depth of the (first) needle asked about.
    pub depth: f64,
}

impl Question {
    pub fn is_answered_by(&self, answer: &str) -> bool {
        self.expected.iter().all(|n| answer.contains(n.as_str()))
    }
}

/// A generated document and the needles hidden in it; `needles[0]` is the one placed at
/// the requested depth (for multi-key, the others are distractors at random depths).
#[derive(Debug, Clone)]
pub struct Case {
    pub document: String,
    pub needles: Vec<Needle>,
}

impl Case {
    /// The questions a case asks: one per needle, or for multi-value needles (which
    /// share their key) one question for all values.
    pub fn questions(&self) -> Vec<Question> {
        match self.needles.first() {
            Some(first) if first.one_of_many => vec![Question {
                text: format!(
                    "What are all the special magic numbers for {} mentioned in the provided text?",
                    first.key
                ),
                expected: self.needles.iter().map(|n| n.number.clone()).collect(),
                depth: first.depth,
            }],
            _ => self
                .needles
                .iter()
                .map(|n| Question {
                    text: n.question(),
                    expected: vec![n.number.clone()],
                    depth: n.depth,
                })
                .collect(),
        }
    }
}

/// What precedes the haystack, as in RULER: it is the start of the user message, so
/// under Star Attention it sits in the anchor block that every block sees.
pub const PREFACE: &str = "Some special magic numbers are hidden within the following text. \
Make sure to memorize it. I will quiz you about the numbers afterwards.\n\n";

/// Builds a case whose document measures at most `budget` tokens by `count_tokens` (and
/// within one filler sentence of it), with the first needle at relative `depth`.
///
/// Needles go between sentences: a needle at depth `d` follows the filler sentences that
/// make up the first `d` of the filler's tokens. Sentences are measured one at a time to
/// place the needles; the whole document is then measured and trimmed from the end,
/// because tokens at sentence joins do not add up exactly.
pub fn build_case(
    seed: u64,
    task: Task,
    depth: f64,
    budget: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Case {
    let mut rng = SplitMix64::new(seed);
    let needles = make_needles(&mut rng, task, depth);
    let fixed: usize = count_tokens(PREFACE)
        + needles
            .iter()
            .map(|n| count_tokens(&format!(" {}", n.sentence())))
            .sum::<usize>();
    let mut filler: Vec<(String, usize)> = Vec::new();
    let mut filler_tokens = 0;
    while fixed + filler_tokens < budget {
        let s = filler_sentence(&mut rng);
        let n = count_tokens(&format!(" {s}"));
        filler_tokens += n;
        filler.push((s, n));
    }
    loop {
        let document = assemble(&filler, &needles, &mut SplitMix64::new(seed ^ 0xA55A));
        if count_tokens(&document) <= budget || filler.is_empty() {
            return Case { document, needles };
        }
        filler.pop();
    }
}

fn make_needles(rng: &mut SplitMix64, task: Task, depth: f64) -> Vec<Needle> {
    let count = match task {
        Task::Single => 1,
        Task::MultiKey => 3 + rng.below(2),
        Task::MultiValue => 4,
    };
    let one_of_many = task == Task::MultiValue;
    // Drawn only for multi-value cases, so the other tasks' cases stay what they were.
    let shared_key =
        one_of_many.then(|| format!("{}-{}", rng.pick(KEY_ADJECTIVES), rng.pick(KEY_NOUNS)));
    let mut needles: Vec<Needle> = Vec::with_capacity(count);
    while needles.len() < count {
        let key = match &shared_key {
            Some(k) => k.clone(),
            None => format!("{}-{}", rng.pick(KEY_ADJECTIVES), rng.pick(KEY_NOUNS)),
        };
        let number = (1_000_000 + rng.below(9_000_000)).to_string();
        let clash = needles
            .iter()
            .any(|n| (n.key == key && !one_of_many) || n.number == number);
        if !clash {
            let depth = if needles.is_empty() {
                depth
            } else {
                rng.unit()
            };
            needles.push(Needle {
                one_of_many,
                key,
                number,
                depth,
            });
        }
    }
    needles
}

/// Joins preface, filler and needles into paragraphs of 4 to 8 sentences.
fn assemble(filler: &[(String, usize)], needles: &[Needle], rng: &mut SplitMix64) -> String {
    let total: usize = filler.iter().map(|(_, n)| n).sum();
    // Filler tokens before each needle; a needle goes before the first sentence that
    // starts at or after its offset (depth 1.0 puts it after the last sentence).
    let mut pending: Vec<(usize, &Needle)> = needles
        .iter()
        .map(|n| ((n.depth.clamp(0.0, 1.0) * total as f64).round() as usize, n))
        .collect();
    pending.sort_by_key(|&(at, _)| at);
    let mut sentences: Vec<String> = Vec::with_capacity(filler.len() + needles.len());
    let mut offset = 0;
    let mut next = 0;
    for (s, n) in filler {
        while next < pending.len() && pending[next].0 <= offset {
            sentences.push(pending[next].1.sentence());
            next += 1;
        }
        sentences.push(s.clone());
        offset += n;
    }
    sentences.extend(pending[next..].iter().map(|(_, n)| n.sentence()));
    let mut document = String::from(PREFACE);
    let mut in_paragraph = 0;
    let mut paragraph_len = 4 + rng.below(5);
    for (i, s) in sentences.iter().enumerate() {
        if i > 0 {
            if in_paragraph == paragraph_len {
                document.push_str("\n\n");
                in_paragraph = 0;
                paragraph_len = 4 + rng.below(5);
            } else {
                document.push(' ');
            }
        }
        document.push_str(s);
        in_paragraph += 1;
    }
    document
}
