//! Choosing the next token from logits (greedy, or temperature → top-k → top-p sampling with a
//! seeded generator), stop sequences, and the generation loop over a [`CausalLm`].

use crate::backend::Backend;
use crate::models::decoder::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How to pick tokens and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; `1` keeps all.
    pub top_p: f32,
    /// Seed of the random generator: the same seed gives the same tokens.
    pub seed: u64,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; the text returned stops before the first one.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Rejects values that have no meaning (a request error, not a panic later).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::Input("stop strings must not be empty".to_owned()));
        }
        Ok(())
    }
}

/// SplitMix64: a small, fast, well-mixed generator; enough for sampling, and reproducible.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens from logits as [`SamplingParams`] say.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: SplitMix64,
}

/// Index of the largest value; the first one on ties (as `torch.argmax`). NaN never wins (a row
/// of only NaN gives 0, as the GPU's argmax does).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if !v.is_nan() && (v > logits[best] || logits[best].is_nan()) {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            rng: SplitMix64(params.seed),
        }
    }

    /// The next token: the argmax at temperature 0, else a draw from the tempered distribution
    /// restricted to the top-k tokens and then to the top-p nucleus (see [`choose`]).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        choose(logits, &self.next_draw())
    }

    /// This step's draw as a backend makes it where the logits are: the parameters and the
    /// uniform [`Sampler::sample`] would use, consumed from the generator exactly as it would
    /// consume it (nothing at temperature 0).
    pub fn next_draw(&mut self) -> TokenDraw {
        TokenDraw {
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).unwrap_or(u32::MAX),
            top_p: self.top_p,
            uniform: if self.temperature == 0.0 {
                0.0
            } else {
                self.rng.next_f64()
            },
        }
    }
}

/// One sequence's token draw for one step: the sampling parameters and the uniform draw in
/// [0, 1) that picks the token. A backend that chooses tokens where the logits are gets one per
/// row, and [`choose`] is its definition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenDraw {
    /// Softmax temperature; `0` means the argmax.
    pub temperature: f32,
    /// Keep only the `top_k` likeliest tokens; `0` keeps all.
    pub top_k: u32,
    /// Keep the smallest set of likeliest tokens whose probability reaches `top_p`; `1` keeps all.
    pub top_p: f32,
    /// The uniform draw.
    pub uniform: f64,
}

impl TokenDraw {
    /// The argmax.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.0,
    };

    /// A draw from the whole tempered distribution with the uniform `u`.
    pub fn uncut(temperature: f32, uniform: f64) -> Self {
        Self {
            temperature,
            uniform,
            ..Self::GREEDY
        }
    }
}

/// The token `draw` picks from `logits`:
/// - temperature 0: the [`argmax`];
/// - nothing cut (top-k 0 or at least the vocabulary, top-p 1): [`draw_in_index_order`];
/// - otherwise the kept set is the `top_k` likeliest tokens (ties to the lower id), then the
///   shortest prefix of them, likeliest first, whose weights reach `top_p` of their total; the
///   draw is made over the kept set in index order, as in [`draw_in_index_order`].
///
/// Drawing in index order rather than likeliest first gives the same distribution and lets a GPU
/// draw with a scan instead of a sort. NaN logits are never kept or drawn; a row with nothing
/// finite gives its argmax.
pub fn choose(logits: &[f32], draw: &TokenDraw) -> u32 {
    let t = draw.temperature;
    if t == 0.0 {
        return argmax(logits);
    }
    let cuts_k = draw.top_k != 0 && (draw.top_k as usize) < logits.len();
    if !cuts_k && draw.top_p >= 1.0 {
        return draw_in_index_order(logits, t, draw.uniform);
    }
    let Some(max) = finite_max(logits) else {
        return argmax(logits);
    };
    let inv_t = 1.0 / f64::from(t);
    let weight = |l: f32| ((f64::from(l) - f64::from(max)) * inv_t).exp();
    // Candidates likeliest first; the lower id first among equal logits (`total_cmp` also puts
    // -0 below +0, as the GPU's order keys do).
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| !logits[i as usize].is_nan())
        .collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if cuts_k && (draw.top_k as usize) < order.len() {
        order.select_nth_unstable_by(draw.top_k as usize - 1, by_logit);
        order.truncate(draw.top_k as usize);
    }
    order.sort_unstable_by(by_logit);
    if draw.top_p < 1.0 {
        let total: f64 = order.iter().map(|&i| weight(logits[i as usize])).sum();
        let target = f64::from(draw.top_p) * total;
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            cumulative += weight(logits[i as usize]);
            if cumulative >= target {
                keep = n + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    let mut weights = vec![0.0; logits.len()];
    for &i in &order {
        weights[i as usize] = weight(logits[i as usize]);
    }
    walk_weights(&weights, draw.uniform)
}

/// The largest logit that is not NaN, if it is finite.
fn finite_max(logits: &[f32]) -> Option<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    max.is_finite().then_some(max)
}

/// A draw from the whole distribution `softmax(logits / temperature)` given a uniform `u` in
/// [0, 1): the first token, in index order, where the running sum of weights passes `u` times
/// their total. No ordering is needed when nothing is cut, which saves sorting the vocabulary at
/// every step (milliseconds per sequence for vocabularies of 150k tokens), and a GPU can make the
/// same draw with a scan. NaN logits never win; a row with nothing finite to draw from gives its
/// argmax. `temperature` must be positive.
pub fn draw_in_index_order(logits: &[f32], temperature: f32, u: f64) -> u32 {
    let Some(max) = finite_max(logits) else {
        return argmax(logits);
    };
    let inv_t = 1.0 / f64::from(temperature);
    let weight = |l: f32| {
        let w = ((f64::from(l) - f64::from(max)) * inv_t).exp();
        if w.is_nan() { 0.0 } else { w }
    };
    let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
    walk_weights(&weights, u)
}

/// The first index whose running sum of `weights` passes `u` times their total (zero weights
/// are never picked; at least one weight must be positive).
fn walk_weights(weights: &[f64], u: f64) -> u32 {
    let total: f64 = weights.iter().sum();
    let mut target = u * total;
    let mut last = 0;
    for (id, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if target < w {
                return id as u32;
            }
            target -= w;
            last = id;
        }
    }
    // Rounding left the target just above the last weight: that token.
    last as u32
}

/// Log-probabilities of one step under the model's own distribution (the softmax of the raw
/// logits, before temperature, top-k and top-p, as OpenAI's API reports them).
#[derive(Clone, Debug, PartialEq)]
pub struct StepLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f64,
    /// The `top` likeliest tokens and their log-probabilities, likeliest first (ties by id).
    pub top: Vec<(u32, f64)>,
}

/// The log-probability of `chosen` and of the `top` likeliest tokens given `logits`.
pub fn step_logprobs(logits: &[f32], chosen: u32, top: usize) -> StepLogprobs {
    // log p_i = l_i - (max + ln Σ e^(l_j - max)), in f64 so that the sum keeps its precision.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    let log_z = f64::from(max) + sum.ln();
    let logprob = |id: u32| {
        logits
            .get(id as usize)
            .map_or(f64::NEG_INFINITY, |&l| f64::from(l) - log_z)
    };
    let top = top.min(logits.len());
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_unstable_by(by_logit);
    StepLogprobs {
        logprob: logprob(chosen),
        top: order.into_iter().map(|id| (id, logprob(id))).collect(),
    }
}

/// The byte offset in `text` where the earliest of `stops` begins, if any occurs. The text a
/// request returns is `&text[..offset]`: the stop string itself is excluded.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context is full.
    Length,
}

impl FinishReason {
    /// The OpenAI API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated token ids (an end-of-sequence token is not included; the token that completed
    /// a stop string is).
    pub ids: Vec<u32>,
    /// Decoded text of the generated tokens, cut before a stop string.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// Generates a continuation of `prompt_ids` with one sequence: prefill, then one decode step per
/// token until an end-of-sequence id, a stop string, `max_tokens` or the context's end.
pub fn generate<B: Backend, M: CausalLm<B> + ?Sized>(
    backend: &B,
    model: &M,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    params: &SamplingParams,
) -> Result<Generation> {
    params.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::Input("the prompt has no tokens".to_owned()));
    }
    let positions = prompt_ids
        .len()
        .saturating_add(params.max_tokens)
        .min(model.max_positions());
    let mut pool = model.new_pool(backend, positions)?;
    let mut cache = pool.new_cache();
    let mut sampler = Sampler::new(params);
    let mut ids = Vec::new();
    let mut text = String::new();
    if params.max_tokens == 0 {
        // Still check that the prompt fits.
        model.prefill(backend, &mut pool, &mut cache, prompt_ids)?;
        return Ok(Generation {
            ids,
            text,
            finish_reason: FinishReason::Length,
        });
    }
    let mut logits = model.prefill(backend, &mut pool, &mut cache, prompt_ids)?;
    loop {
        let id = sampler.sample(&logits);
        if model.eos_token_ids().contains(&id) {
            return Ok(Generation {
                ids,
                text,
                finish_reason: FinishReason::Stop,
            });
        }
        ids.push(id);
        // Whole-text decoding each step keeps multi-byte characters and merges right; an
        // incremental detokenizer replaces it when streaming lands.
        text = tokenizer.decode(&ids, true)?;
        if let Some(at) = find_stop(&text, &params.stop) {
            text.truncate(at);
            return Ok(Generation {
                ids,
                text,
                finish_reason: FinishReason::Stop,
            });
        }
        if ids.len() >= params.max_tokens || cache.remaining() == 0 {
            return Ok(Generation {
                ids,
                text,
                finish_reason: FinishReason::Length,
            });
        }
        logits = model.decode_step(backend, &mut pool, &mut cache, id)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, -1.0, 1.5, 0.7, 1.9, -3.0, 0.0]
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::default()
        }
    }

    fn draws(p: &SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..n).map(|_| s.sample(&logits())).collect()
    }

    #[test]
    fn greedy_picks_argmax() {
        assert_eq!(draws(&params(0.0, 0, 1.0, 7), 5), vec![1; 5]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1, "first of ties");
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        assert_eq!(draws(&params(1.5, 1, 1.0, 3), 50), vec![1; 50]);
        assert_eq!(draws(&params(1.5, 0, 1e-6, 3), 50), vec![1; 50]);
    }

    #[test]
    fn top_k_restricts_to_the_k_best() {
        let got = draws(&params(5.0, 3, 1.0, 11), 500);
        assert!(got.iter().all(|id| [1, 5, 3].contains(id)));
        for id in [1, 5, 3] {
            assert!(got.contains(&id), "{id} never drawn");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities at T=1 sorted: 1 (.32), 5 (.29), 3 (.19), ...: 0.5 needs the first two.
        let got = draws(&params(1.0, 0, 0.5, 5), 500);
        assert!(got.iter().all(|id| [1, 5].contains(id)), "{got:?}");
        assert!(got.contains(&1) && got.contains(&5));
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let a = draws(&params(1.0, 0, 1.0, 42), 200);
        assert_eq!(a, draws(&params(1.0, 0, 1.0, 42), 200));
        assert_ne!(a, draws(&params(1.0, 0, 1.0, 43), 200));
    }

    #[test]
    fn temperature_scales_the_distribution() {
        let frequency = |t: f32| {
            let got = draws(&params(t, 0, 1.0, 9), 4000);
            got.iter().filter(|&&id| id == 1).count() as f64 / got.len() as f64
        };
        // Low temperature concentrates on the argmax, high flattens towards 1/8.
        let (cold, warm, hot) = (frequency(0.05), frequency(1.0), frequency(100.0));
        assert!(cold > 0.85, "cold {cold}");
        assert!((warm - 0.32).abs() < 0.04, "warm {warm}");
        assert!((hot - 0.125).abs() < 0.03, "hot {hot}");
    }

    #[test]
    fn draws_follow_the_softmax_on_both_paths() {
        // 20k draws at T = 1.3 from the whole distribution (index-order path) and with a top-k
        // that keeps every token (sorted path): each token's frequency within 4.5 standard
        // errors of its softmax probability.
        let l = logits();
        let weights: Vec<f64> = l.iter().map(|&x| (f64::from(x) / 1.3).exp()).collect();
        let total: f64 = weights.iter().sum();
        let n = 20_000;
        for top_k in [0, 8] {
            let got = draws(&params(1.3, top_k, 1.0, 77), n);
            for (id, w) in weights.iter().enumerate() {
                let p = w / total;
                let freq = got.iter().filter(|&&g| g as usize == id).count() as f64 / n as f64;
                let se = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (freq - p).abs() < 4.5 * se,
                    "top_k {top_k}: token {id}: {freq} vs {p}"
                );
            }
        }
    }

    #[test]
    fn next_draw_and_choose_reproduce_the_sampler() {
        // Drawing through `next_draw` (as a backend does) gives the tokens `sample` gives, from
        // the same seed, cut or not.
        let l = logits();
        for (t, k, top_p) in [
            (0.0, 0, 1.0),
            (0.6, 0, 1.0),
            (1.0, 3, 1.0),
            (2.0, 0, 0.7),
            (1.3, 5, 0.9),
        ] {
            let p = params(t, k, top_p, 99);
            let (mut host, mut device) = (Sampler::new(&p), Sampler::new(&p));
            for _ in 0..300 {
                let want = host.sample(&l);
                assert_eq!(choose(&l, &device.next_draw()), want, "{p:?}");
            }
        }
        let greedy = Sampler::new(&params(0.0, 3, 0.9, 0)).next_draw();
        assert_eq!(
            (greedy.temperature, greedy.uniform),
            (0.0, 0.0),
            "greedy draws nothing"
        );
    }

    #[test]
    fn cuts_keep_the_lower_ids_among_equal_logits() {
        // Five equal logits: top-k 2 keeps ids 0 and 1; top-p 0.5 needs 2.5 tokens' worth, so 3.
        let flat = [0.5f32; 5];
        let drawn = |top_k: u32, top_p: f32| {
            let mut seen = [false; 5];
            for n in 0..1000 {
                let u = (f64::from(n) + 0.5) / 1000.0;
                let c = TokenDraw {
                    temperature: 1.0,
                    top_k,
                    top_p,
                    uniform: u,
                };
                seen[choose(&flat, &c) as usize] = true;
            }
            seen
        };
        assert_eq!(drawn(2, 1.0), [true, true, false, false, false]);
        assert_eq!(drawn(0, 0.5), [true, true, true, false, false]);
        assert_eq!(
            drawn(4, 0.5),
            [true, true, false, false, false],
            "0.5 of 4 is exactly 2"
        );
        assert_eq!(drawn(1, 1.0), [true, false, false, false, false]);
    }

    #[test]
    fn cut_draws_follow_the_renormalised_softmax() {
        // Kept set at T = 1, top-p 0.7: ids 1, 5, 3 (0.32 + 0.29 + 0.19 >= 0.7). 20k draws, each
        // kept token's frequency within 4.5 standard errors of its share of the kept mass.
        let l = logits();
        let kept = [1usize, 5, 3];
        let mass: f64 = kept.iter().map(|&i| f64::from(l[i]).exp()).sum();
        let n = 20_000;
        let got = draws(&params(1.0, 0, 0.7, 5), n);
        for &id in &kept {
            let p = f64::from(l[id]).exp() / mass;
            let freq = got.iter().filter(|&&g| g as usize == id).count() as f64 / n as f64;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!((freq - p).abs() < 4.5 * se, "token {id}: {freq} vs {p}");
        }
        assert!(got.iter().all(|g| kept.contains(&(*g as usize))));
    }

    #[test]
    fn cuts_never_keep_nan() {
        let l = [f32::NAN, 1.0, f32::NAN, 0.9, f32::NEG_INFINITY];
        for top_k in [1, 2, 3, 4] {
            for u in [0.0, 0.3, 0.6, 0.999] {
                let c = TokenDraw {
                    temperature: 1.0,
                    top_k,
                    top_p: 0.95,
                    uniform: u,
                };
                let id = choose(&l, &c);
                assert!(id == 1 || id == 3, "top_k {top_k}, u {u}: {id}");
            }
        }
        let nothing = TokenDraw {
            temperature: 1.0,
            top_k: 1,
            top_p: 0.5,
            uniform: 0.5,
        };
        assert_eq!(choose(&[f32::NAN, f32::NAN], &nothing), 0, "the argmax's answer");
    }

    #[test]
    fn masked_and_nan_logits_are_never_drawn() {
        let inf = f32::NEG_INFINITY;
        let mut s = Sampler::new(&params(1.0, 0, 1.0, 3));
        for _ in 0..200 {
            let id = s.sample(&[inf, f32::NAN, 0.5, inf, 0.4]);
            assert!(id == 2 || id == 4, "{id}");
        }
        assert_eq!(s.sample(&[inf, inf, inf]), 0, "nothing to draw: the argmax");
        assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0, "all NaN: argmax's answer");
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 1.0]), 1);
    }

    /// Time per draw over a 151,936-token vocabulary (Qwen2's), whole distribution against
    /// top-p 0.9 (which sorts); run with `cargo test --release -p atomic-worker --lib
    /// sampling::tests::draw_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, not a check"]
    fn draw_cost() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let logits: Vec<f32> = (0..151_936)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
            })
            .collect();
        for top_p in [1.0, 0.9] {
            let mut s = Sampler::new(&params(0.8, 0, top_p, 1));
            let rounds = 50;
            let started = std::time::Instant::now();
            let sum: u64 = (0..rounds).map(|_| u64::from(s.sample(&logits))).sum();
            let per = started.elapsed().as_secs_f64() / rounds as f64;
            eprintln!("top_p {top_p}: {:.3} ms per draw (checksum {sum})", per * 1e3);
        }
    }

    #[test]
    fn stop_strings_trim_the_text() {
        let stops = vec!["\n\n".to_owned(), "END".to_owned()];
        assert_eq!(find_stop("hello", &stops), None);
        assert_eq!(find_stop("hello END more", &stops), Some(6));
        assert_eq!(find_stop("a\n\nb END", &stops), Some(1), "earliest wins");
        // A stop string split across two tokens: found only once the second token arrives.
        let stops = vec!["STOP".to_owned()];
        let tokens = ["Go ", "ST", "OP", " now"];
        let mut text = String::new();
        let mut found = None;
        for (n, token) in tokens.iter().enumerate() {
            text.push_str(token);
            if let Some(at) = find_stop(&text, &stops) {
                found = Some((n, at));
                break;
            }
        }
        assert_eq!(found, Some((2, 3)));
        assert_eq!(&text[..3], "Go ");
    }

    #[test]
    fn invalid_params_are_input_errors() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 0, 1.5, 0).validate().is_err());
        assert!(params(0.0, 0, 1.0, 0).validate().is_ok());
    }

    #[test]
    fn step_logprobs_are_a_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let want = |i: usize| (f64::from(logits[i]).exp() / z).ln();
        let got = step_logprobs(&logits, 2, 3);
        assert!((got.logprob - want(2)).abs() < 1e-6);
        // Likeliest first; the tie between ids 1 and 3 goes to the lower id.
        let ids: Vec<u32> = got.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        for &(id, lp) in &got.top {
            assert!((lp - want(id as usize)).abs() < 1e-6, "token {id}");
        }
        let total: f64 = (0..logits.len())
            .map(|i| step_logprobs(&logits, i as u32, 0).logprob.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "probabilities sum to {total}");
        assert!(step_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(step_logprobs(&logits, 0, 99).top.len(), logits.len());
        // Large logits do not overflow.
        let big = step_logprobs(&[1000.0, 999.0], 1, 1);
        assert!((big.logprob - (-1.0 - (1.0 + (-1.0f64).exp()).ln())).abs() < 1e-9);
    }
}
