//! The post-processing of the encoder tasks, as pure functions over model outputs: probabilities
//! from classification logits, zero-shot classification by embedding similarity, and grouping
//! of per-token BIO (IOB2) tags into entities with byte offsets.

use atomic_protocol::{Entity, LabelScore};

use crate::tokenizer::Encoding;

/// Softmax of `logits` (max-subtracted, so large logits do not overflow).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Cosine similarity of two vectors; 0 when either is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Scores `labels` from their logits: softmax over all of them, best first.
pub fn label_scores(labels: &[String], logits: &[f32]) -> Vec<LabelScore> {
    let mut scores: Vec<LabelScore> = labels
        .iter()
        .zip(softmax(logits))
        .map(|(label, score)| LabelScore {
            label: label.clone(),
            score,
        })
        .collect();
    scores.sort_by(|a, b| b.score.total_cmp(&a.score));
    scores
}

/// The scale applied to cosine similarities before the softmax of zero-shot classification:
/// sentence-transformers trains its embedding models with this scale (the default of
/// `MultipleNegativesRankingLoss`), so scaled similarities behave like its training logits.
pub const ZERO_SHOT_SCALE: f32 = 20.0;

/// Zero-shot classification: each label scores by the cosine similarity of its embedding to the
/// input's, turned into probabilities by a softmax over the scaled similarities. Best first.
pub fn zero_shot(input: &[f32], labels: &[String], label_embeddings: &[Vec<f32>]) -> Vec<LabelScore> {
    let logits: Vec<f32> = label_embeddings
        .iter()
        .map(|e| cosine(input, e) as f32 * ZERO_SHOT_SCALE)
        .collect();
    label_scores(labels, &logits)
}

/// A token-level tag in the BIO (IOB2) scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag<'a> {
    /// Outside any entity (`O`).
    Outside,
    /// First token of an entity of this type (`B-TYPE`).
    Begin(&'a str),
    /// A following token of an entity of this type (`I-TYPE`, or a bare `TYPE` as in the IO scheme).
    Inside(&'a str),
}

impl<'a> Tag<'a> {
    /// Parses a label such as `B-ORDER`, `I-ORDER`, `O` (also `B_ORDER`, and bare `ORDER`).
    pub fn parse(label: &'a str) -> Self {
        if label == "O" || label.is_empty() {
            return Tag::Outside;
        }
        let prefix_type = |p: &str| {
            label
                .strip_prefix(&format!("{p}-"))
                .or_else(|| label.strip_prefix(&format!("{p}_")))
        };
        if let Some(t) = prefix_type("B") {
            Tag::Begin(t)
        } else if let Some(t) = prefix_type("I") {
            Tag::Inside(t)
        } else {
            Tag::Inside(label)
        }
    }
}

/// One token's prediction: its tag, the probability of that tag, and its byte span.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTag<'a> {
    /// Predicted tag.
    pub tag: Tag<'a>,
    /// Probability of the predicted tag.
    pub score: f64,
    /// Byte range of the input the token covers.
    pub span: (usize, usize),
}

/// Turns per-token logits (`[tokens][labels]`, the real tokens of `encoding`) into per-token
/// tags by argmax, leaving out special tokens.
pub fn token_tags<'a>(encoding: &Encoding, logits: &[Vec<f32>], id2label: &'a [String]) -> Vec<TokenTag<'a>> {
    logits
        .iter()
        .enumerate()
        .filter(|(t, _)| !encoding.special_tokens_mask.get(*t).copied().unwrap_or(true))
        .filter_map(|(t, row)| {
            let probs = softmax(row);
            let (best, score) = probs
                .iter()
                .copied()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))?;
            let label = id2label.get(best)?;
            Some(TokenTag {
                tag: Tag::parse(label),
                score,
                span: *encoding.offsets.get(t)?,
            })
        })
        .collect()
}

/// Groups tagged tokens into entities. `B-X` starts an entity; `I-X` continues an entity of
/// type X, or starts one when none is open or the open one has another type; `O` ends the open
/// entity. An entity's span runs from its first token's start to its last token's end, and its
/// score is the mean probability of its tokens.
pub fn group_entities(text: &str, tokens: &[TokenTag<'_>]) -> Vec<Entity> {
    struct Open<'a> {
        kind: &'a str,
        start: usize,
        end: usize,
        score_sum: f64,
        count: usize,
    }
    let mut entities = Vec::new();
    let mut open: Option<Open<'_>> = None;
    let close = |open: Option<Open<'_>>, entities: &mut Vec<Entity>| {
        if let Some(o) = open
            && let Some(slice) = text.get(o.start..o.end)
        {
            entities.push(Entity {
                entity_type: o.kind.to_owned(),
                text: slice.to_owned(),
                start: o.start,
                end: o.end,
                score: o.score_sum / o.count as f64,
            });
        }
    };
    for token in tokens {
        let (start, end) = token.span;
        let new = |kind| Open {
            kind,
            start,
            end,
            score_sum: token.score,
            count: 1,
        };
        match token.tag {
            Tag::Outside => close(open.take(), &mut entities),
            Tag::Begin(kind) => {
                close(open.take(), &mut entities);
                open = Some(new(kind));
            }
            Tag::Inside(kind) => match &mut open {
                Some(o) if o.kind == kind => {
                    o.end = o.end.max(end);
                    o.score_sum += token.score;
                    o.count += 1;
                }
                _ => {
                    close(open.take(), &mut entities);
                    open = Some(new(kind));
                }
            },
        }
    }
    close(open, &mut entities);
    entities
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(tag: &'static str, score: f64, span: (usize, usize)) -> TokenTag<'static> {
        TokenTag {
            tag: Tag::parse(tag),
            score,
            span,
        }
    }

    #[test]
    fn parses_tags() {
        assert_eq!(Tag::parse("O"), Tag::Outside);
        assert_eq!(Tag::parse("B-ORDER"), Tag::Begin("ORDER"));
        assert_eq!(Tag::parse("I-ORDER"), Tag::Inside("ORDER"));
        assert_eq!(Tag::parse("B_LOC"), Tag::Begin("LOC"));
        assert_eq!(Tag::parse("PER"), Tag::Inside("PER"));
    }

    #[test]
    fn b_i_i_is_one_entity_with_mean_score() {
        let text = "order A-12 3 now";
        let tokens = [
            tok("O", 0.9, (0, 5)),
            tok("B-ORDER", 0.8, (6, 7)),
            tok("I-ORDER", 0.6, (7, 10)),
            tok("I-ORDER", 0.7, (11, 12)),
            tok("O", 0.9, (13, 16)),
        ];
        let e = group_entities(text, &tokens);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].entity_type, "ORDER");
        assert_eq!(e[0].text, "A-12 3");
        assert_eq!((e[0].start, e[0].end), (6, 12));
        assert!((e[0].score - 0.7).abs() < 1e-12);
    }

    #[test]
    fn i_without_b_starts_an_entity_and_type_change_splits() {
        let text = "aa bb cc dd";
        let tokens = [
            tok("I-PRODUCT", 0.5, (0, 2)),
            tok("I-PRODUCT", 0.5, (3, 5)),
            tok("I-ORDER", 0.5, (6, 8)),
            tok("B-ORDER", 0.5, (9, 11)),
        ];
        let e = group_entities(text, &tokens);
        let got: Vec<_> = e
            .iter()
            .map(|e| (e.entity_type.as_str(), e.text.as_str()))
            .collect();
        assert_eq!(got, [("PRODUCT", "aa bb"), ("ORDER", "cc"), ("ORDER", "dd")]);
    }

    #[test]
    fn o_ends_an_entity_and_b_after_b_splits() {
        let text = "x y z w";
        let tokens = [
            tok("B-ORDER", 1.0, (0, 1)),
            tok("O", 1.0, (2, 3)),
            tok("I-ORDER", 1.0, (4, 5)),
            tok("B-ORDER", 1.0, (6, 7)),
        ];
        let e = group_entities(text, &tokens);
        let spans: Vec<_> = e.iter().map(|e| (e.start, e.end)).collect();
        assert_eq!(spans, [(0, 1), (4, 5), (6, 7)]);
        assert!(group_entities(text, &[tok("O", 1.0, (0, 1))]).is_empty());
    }

    #[test]
    fn special_tokens_are_skipped() {
        let encoding = Encoding {
            ids: vec![1, 5, 2],
            type_ids: vec![0; 3],
            offsets: vec![(0, 0), (0, 3), (0, 0)],
            special_tokens_mask: vec![true, false, true],
        };
        let labels = vec!["O".to_owned(), "B-X".to_owned()];
        // Every token, special ones included, predicts B-X.
        let logits = vec![vec![0.0, 5.0]; 3];
        let tags = token_tags(&encoding, &logits, &labels);
        assert_eq!(tags.len(), 1);
        let e = group_entities("abc", &tags);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].start, e[0].end, e[0].text.as_str()), (0, 3, "abc"));
    }

    #[test]
    fn zero_shot_picks_the_closest_label() {
        let labels = vec!["north".to_owned(), "east".to_owned(), "south".to_owned()];
        let embeddings = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![0.0, -1.0]];
        let scores = zero_shot(&[0.9, 0.2], &labels, &embeddings);
        assert_eq!(scores[0].label, "east");
        assert_eq!(scores[2].label, "south");
        let total: f64 = scores.iter().map(|s| s.score).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(scores.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn softmax_is_stable() {
        let p = softmax(&[1000.0, 1000.0]);
        assert_eq!(p, vec![0.5, 0.5]);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
