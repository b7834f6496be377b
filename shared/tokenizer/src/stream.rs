//! Turning a stream of token ids into a stream of text that is always valid UTF-8, and cutting
//! it at stop strings without ever emitting text that a stop string later claims.

use crate::{Result, Tokenizer};

/// Incremental detokenizer.
///
/// A token may end in the middle of a multi-byte character, and some tokenizers change the text
/// of earlier tokens depending on what follows (leading-space handling). So each step decodes a
/// short window — a few already-emitted tokens plus the new ones — and emits only the text past
/// what the window had already produced, holding back output that ends in a partial character.
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

const REPLACEMENT: char = '\u{FFFD}';

impl DecodeStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one token; returns the text it completes, if any.
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if now.len() <= before.len() || now.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        // Normally the window's text only grows. If the tokenizer re-spelled earlier text, emit
        // what follows the part both spellings share, so the stream never stalls.
        let common = if now.starts_with(&before) {
            before.len()
        } else {
            now.char_indices().zip(before.chars()).take_while(|((_, a), b)| a == b).map(|((i, a), _)| i + a.len_utf8()).last().unwrap_or(0)
        };
        let delta = now[common..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(delta))
    }

    /// Text still held back at the end of the stream (an unfinished character shows as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let before = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(now.get(before.len()..).filter(|d| !d.is_empty()).map(str::to_string))
    }
}

/// Finds stop strings in streamed text.
///
/// Text that could still grow into a stop string is held back, so a client never receives the
/// beginning of a stop string that is then cut.
#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// Outcome of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send.
    pub text: String,
    /// Index in `stops` of the stop string that matched, if one did; `text` then ends before it.
    pub stopped: Option<usize>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        self.pending.push_str(delta);
        // Earliest match wins.
        let hit = self.stops.iter().enumerate().filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i))).min();
        if let Some((at, i)) = hit {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome { text, stopped: Some(i) };
        }
        let keep = self.longest_partial_suffix();
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome { text, stopped: None }
    }

    /// Releases the held-back text at the end of the stream.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of some stop string.
    fn longest_partial_suffix(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(p.len());
            for k in (best + 1..=max).rev() {
                if p.is_char_boundary(p.len() - k) && s.as_bytes().starts_with(&p.as_bytes()[p.len() - k..]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut StopMatcher, parts: &[&str]) -> (String, Option<usize>) {
        let mut out = String::new();
        for p in parts {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_string_split_across_deltas_is_never_leaked() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        let o = m.push("Hello\n");
        assert_eq!(o.text, "Hello");
        let o = m.push("\nUs");
        assert_eq!(o.text, "");
        let o = m.push("er: more");
        assert_eq!(o, StopOutcome { text: String::new(), stopped: Some(0) });
    }

    #[test]
    fn partial_match_that_fails_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(feed(&mut m, &["the E", "ND"]), ("the ".into(), Some(0)));
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(feed(&mut m, &["the E", "nd"]), ("the End".into(), None));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let mut m = StopMatcher::new(vec!["b".into(), "é!".into()]);
        assert_eq!(feed(&mut m, &["aé!b"]), ("a".into(), Some(1)));
        let mut m = StopMatcher::new(vec!["éx".into()]);
        assert_eq!(feed(&mut m, &["é", "é"]), ("éé".into(), None));
    }
}
