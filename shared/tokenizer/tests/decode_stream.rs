//! Streaming detokenization on the default model's byte-level BPE, where one emoji or CJK
//! character spans several tokens: every piece sent must be whole characters.

use std::path::PathBuf;

use tandem_tokenizer::{DecodeStream, ModelFiles, Tokenizer};

/// The default model, where `tandem fetch-model` (run by scripts/test.sh) puts it. Missing is a
/// failure, not a skip.
fn default_tokenizer() -> Tokenizer {
    let dir = std::env::var_os("TANDEM_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tandem/models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{} is missing: run `cargo run -p tandem -- fetch-model` (scripts/test.sh does)", path.display());
    Tokenizer::load(&ModelFiles::resolve(path.to_str().unwrap()).unwrap()).unwrap()
}

const TEXTS: &[&str] = &[
    "Rust 🦀 is fast; 東京は日本の首都です。",
    "🦀🦀🦀",
    "emoji with modifiers: 👍🏽 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "中文、日本語、한국어 mixed with English and 数字 123.",
    "trailing crab 🦀",
];

/// Feeds `ids` one at a time; returns every piece the stream released, the last from `finish`.
fn stream_pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut stream = DecodeStream::new();
    let mut pieces = Vec::new();
    for &id in ids {
        if let Some(piece) = stream.step(tok, id).unwrap() {
            pieces.push(piece);
        }
    }
    pieces.extend(stream.finish(tok).unwrap());
    pieces
}

#[test]
fn multi_token_characters_are_never_split_or_mangled() {
    let tok = default_tokenizer();
    let mut split_characters = 0;
    for text in TEXTS {
        let ids = tok.encode(text).unwrap();
        let whole = tok.decode(&ids).unwrap();
        assert_eq!(whole.trim(), text.trim(), "the tokenizer round-trips {text:?}");

        // The test means something only if some token alone is part of a character.
        split_characters += ids.iter().filter(|&&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}')).count();

        let pieces = stream_pieces(&tok, &ids);
        for piece in &pieces {
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?} holds a broken character ({pieces:?})");
        }
        assert_eq!(pieces.concat(), whole, "{text:?}: the pieces must add up to the whole text");
    }
    assert!(split_characters > 0, "no character of the test texts spans several tokens");
}

#[test]
fn a_stream_cut_inside_a_character_releases_only_the_whole_ones() {
    let tok = default_tokenizer();
    let ids = tok.encode("ok 🦀").unwrap();
    // One token short of the end, the crab is incomplete.
    let short = tok.decode(&ids[..ids.len() - 1]).unwrap();
    assert!(short.ends_with('\u{FFFD}'), "the crab spans several tokens: {ids:?} {short:?}");

    let mut stream = DecodeStream::new();
    let mut sent = String::new();
    for &id in &ids[..ids.len() - 1] {
        if let Some(piece) = stream.step(&tok, id).unwrap() {
            sent.push_str(&piece);
        }
    }
    // One byte-token short of the crab: nothing of it may have been sent yet.
    assert_eq!(sent.trim_end(), "ok", "sent {sent:?}");
    assert!(!sent.contains('\u{FFFD}'));
    let last = stream.step(&tok, *ids.last().unwrap()).unwrap().expect("the last token completes the crab");
    assert!(last.ends_with('🦀'), "{last:?}");
    assert_eq!(format!("{sent}{last}"), tok.decode(&ids).unwrap());
}
