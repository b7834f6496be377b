//! Prompts of random tokens with an exact token count.

use rand::Rng;

use crate::{Result, TokenCounter};

/// Decoding random ids and encoding the text again rarely gives the same ids (merges across
/// token boundaries, special tokens dropped), so the ids are corrected this many times.
const ROUNDS: usize = 16;

/// Text whose prompt encoding has `target` tokens (BOS included), and that count. After
/// `ROUNDS` corrections the text is accepted with whatever count it has, which is what is
/// reported; in practice the target is hit within a few rounds.
pub fn random_text(counter: &TokenCounter, rng: &mut impl Rng, target: usize) -> Result<(String, usize)> {
    let body = target.saturating_sub(counter.overhead()).max(1);
    let vocab = counter.vocab_size().max(2) as u32;
    let mut ids: Vec<u32> = (0..body).map(|_| rng.random_range(0..vocab)).collect();
    let mut best: Option<(String, usize)> = None;
    for _ in 0..ROUNDS {
        let text = counter.decode(&ids)?;
        let got = counter.body_ids(&text)?;
        let len = got.len() + counter.overhead();
        if len == target {
            return Ok((text, len));
        }
        let closer = best.as_ref().is_none_or(|(_, b)| b.abs_diff(target) > len.abs_diff(target));
        if closer {
            best = Some((text, len));
        }
        ids = got;
        if ids.len() > body {
            ids.truncate(body);
        } else {
            ids.extend((ids.len()..body).map(|_| rng.random_range(0..vocab)));
        }
    }
    Ok(best.expect("at least one round ran"))
}
