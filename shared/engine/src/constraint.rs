//! Structured output on the worker: a request's [`Constraint`] compiled (by llguidance) into a
//! [`Grammar`] that says, before every sampling step, which tokens may come next. The batcher
//! sets every other token's logit to minus infinity, samples as usual, and advances the grammar
//! with the token drawn; the sequence ends when the grammar is complete. The grammar's state is
//! a function of the tokens generated so far, so a worker that takes a sequence over (decode
//! after prefill, or after a resume) rebuilds it by feeding it those tokens.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tandem_protocol::{ApiError, Constraint};
use toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie, TokenizerEnv};

/// Compiles constraints against one model's vocabulary (built once per worker).
pub struct Constraints {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for Constraints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraints").field("vocab", &self.vocab).finish()
    }
}

impl Constraints {
    /// From the tokenizer (its `tokenizer.json` form), for logits of `vocab` entries. The
    /// sequence may end (where the grammar allows it) with any of `eos_ids`.
    pub fn new(tokenizer_json: &str, vocab: usize, eos_ids: &[u32]) -> Result<Self, String> {
        let json: Value = serde_json::from_str(tokenizer_json).map_err(|e| format!("tokenizer JSON: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| format!("tokenizer vocabulary: {e}"))?;
        let vocab = vocab.max(words.len());
        words.resize(vocab, Vec::new());
        let eos = *eos_ids.first().ok_or("the tokenizer names no end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, eos), &words).with_eos_tokens(eos_ids);
        let env: Arc<dyn TokenizerEnv + Sync> = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("grammar engine: {e}"))?;
        factory.quiet();
        Ok(Self { factory, vocab })
    }

    /// The grammar for `c`, advanced over `generated` (tokens already sent to the client). A
    /// constraint that does not compile, or tokens it does not allow, are the request's fault.
    pub fn compile(&self, c: &Constraint, generated: &[u32]) -> Result<Grammar, ApiError> {
        let bad = |what: String| ApiError::invalid("response_format", what);
        let grammar = match c {
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
            Constraint::JsonSchema { schema } => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Constraint::Regex { pattern } => TopLevelGrammar::from_regex(pattern),
            Constraint::Choice { choices } => {
                let alternatives: Vec<String> = choices.iter().map(|c| serde_json::to_string(c).unwrap_or_default()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Constraint::Lark { grammar } => TopLevelGrammar::from_lark(grammar.clone()),
        };
        let mut matcher = Matcher::new(self.factory.create_parser(grammar));
        if let Some(e) = matcher.get_error() {
            return Err(bad(format!("the output constraint does not compile: {e}")));
        }
        if !generated.is_empty() {
            matcher.consume_tokens(generated).map_err(|e| bad(format!("the tokens generated so far break the output constraint: {e}")))?;
        }
        Ok(Grammar { matcher, vocab: self.vocab })
    }
}

/// JSON as it is usually written compactly: no whitespace between tokens. With whitespace
/// allowed anywhere, a sampled model can wander in it until `max_tokens`.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(o) = &mut schema {
        o.entry("x-guidance").or_insert_with(|| json!({"whitespace_flexible": false}));
    }
    schema
}

/// One sequence's grammar state.
pub struct Grammar {
    matcher: Matcher,
    vocab: usize,
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self { matcher: self.matcher.deep_clone(), vocab: self.vocab }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Grammar {
    /// Sets the logit of every token the grammar does not allow next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| format!("output constraint: {e}"))?;
        let n = allowed.len().min(logits.len());
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            if i < n && allowed.is_allowed(i as u32) {
                any |= l.is_finite() || *l == f32::INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if any {
            Ok(())
        } else {
            Err("output constraint: no token of the vocabulary can continue the text".into())
        }
    }

    /// The tokens the grammar allows next as a bitmask (bit `t % 32` of word `t / 32` for token
    /// `t`), for an engine that masks the logits where they are: `words` has room for the
    /// vocabulary and is overwritten. Fails, as [`Grammar::mask`] does, when nothing may follow.
    pub fn allowed_words(&mut self, words: &mut [u32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| format!("output constraint: {e}"))?;
        words.fill(0);
        let n = allowed.len().min(self.vocab).min(words.len() * 32);
        let mut any = false;
        for t in 0..n {
            if allowed.is_allowed(t as u32) {
                words[t / 32] |= 1 << (t % 32);
                any = true;
            }
        }
        if any {
            Ok(())
        } else {
            Err("output constraint: no token of the vocabulary can continue the text".into())
        }
    }

    /// Advances over the token drawn. `Ok(true)` when the text is complete: nothing may follow.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.matcher.consume_token(token).map_err(|e| format!("output constraint: {e}"))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 bytes, a few merges, and an end-of-sequence token.
    fn constraints() -> Constraints {
        let mut vocab = serde_json::Map::new();
        let char_of = |b: u8| -> char {
            // GPT-2's byte-to-character map: printable bytes stand for themselves.
            let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
            if printable {
                b as char
            } else {
                let mut n = 0u32;
                for x in 0..=255u8 {
                    let p = (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
                    if !p {
                        if x == b {
                            break;
                        }
                        n += 1;
                    }
                }
                char::from_u32(256 + n).unwrap()
            }
        };
        for b in 0..=255u8 {
            vocab.insert(char_of(b).to_string(), json!(b as u32));
        }
        for (i, w) in ["yes", "no", "{\"", "true", "false"].iter().enumerate() {
            vocab.insert(w.to_string(), json!(256 + i));
        }
        let tokenizer = json!({
            "added_tokens": [{"id": 261, "content": "<|endoftext|>", "special": true}],
            "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab},
        });
        Constraints::new(&tokenizer.to_string(), 262, &[261]).unwrap()
    }

    fn allowed(g: &mut Grammar) -> Vec<u32> {
        let mut logits = vec![0.0f32; 262];
        g.mask(&mut logits).unwrap();
        (0..262).filter(|&i| logits[i as usize].is_finite()).collect()
    }

    #[test]
    fn a_choice_allows_only_its_words_then_ends() {
        let c = constraints();
        let mut g = c.compile(&Constraint::Choice { choices: vec!["yes".into(), "no".into()] }, &[]).unwrap();
        let first = allowed(&mut g);
        assert!(first.contains(&256) && first.contains(&257) && first.contains(&(b'y' as u32)), "{first:?}");
        assert!(!first.contains(&(b'x' as u32)) && !first.contains(&261));
        assert_eq!(g.advance(256), Ok(true), "`yes` is a whole choice: nothing may follow");
    }

    #[test]
    fn a_schema_masks_to_json_that_fits_it_and_state_is_rebuilt_from_tokens() {
        let c = constraints();
        let schema = Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}),
        };
        let mut g = c.compile(&schema, &[]).unwrap();
        // `{"` then `ok":` byte by byte, then only `t`/`f` (or their merges) may follow.
        let prefix: Vec<u32> = std::iter::once(258).chain("ok\":".bytes().map(u32::from)).collect();
        for &t in &prefix {
            assert!(allowed(&mut g).contains(&t));
            assert_eq!(g.advance(t), Ok(false));
        }
        let next = allowed(&mut g);
        assert!(next.contains(&259) && next.contains(&260) && next.contains(&(b't' as u32)), "{next:?}");
        assert!(!next.contains(&(b'1' as u32)) && !next.contains(&(b' ' as u32)), "compact JSON, booleans only: {next:?}");
        // A worker taking the sequence over gets the same state from the tokens alone.
        let mut rebuilt = c.compile(&schema, &prefix).unwrap();
        assert_eq!(allowed(&mut rebuilt), next);
        assert_eq!(g.advance(259), Ok(false));
        assert_eq!(g.advance(b'}' as u32), Ok(true));
        // Tokens the grammar refuses, and a grammar that does not compile, are the request's.
        assert!(c.compile(&schema, &[b'x' as u32]).is_err());
        assert!(c.compile(&Constraint::Lark { grammar: "start: (".into() }, &[]).is_err());
    }
}
