//! Chat templates from a broken or hostile model file: whatever the template does (loops without
//! end, huge ranges, recursion, undefined names, `raise_exception`), compiling and rendering it
//! never panics and never hangs; it fails with an error within a bounded time. And whatever the
//! messages hold, they are data: they render verbatim and never run as template code.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use tandem_tokenizer::{ChatMessage, ChatTemplate};

/// Longest any one compile-and-render may take here (the fuel ends a runaway render well
/// before; debug builds on a loaded machine are slow).
const BOUND: Duration = Duration::from_secs(10);

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn conversation() -> Vec<ChatMessage> {
    vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")]
}

/// Compiles and renders `source`: `Ok(text)`, or the error's message. Panics (failing the test)
/// if that took longer than [`BOUND`].
fn run(source: &str, messages: &[ChatMessage]) -> Result<String, String> {
    let started = Instant::now();
    let out = ChatTemplate::new(source).and_then(|t| t.render(messages, true, "<s>", "</s>")).map_err(|e| e.to_string());
    let took = started.elapsed();
    assert!(took < BOUND, "{source:?} took {took:?}");
    out
}

/// Templates that must fail, each with a word its error must contain.
const HOSTILE: &[(&str, &str)] = &[
    // Loops that would run for hours: the fuel stops them.
    ("{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}", "fuel"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}{% endfor %}", "fuel"),
    ("{% for m in messages * 100000 %}{% for n in messages * 100000 %}{% endfor %}{% endfor %}", "fuel"),
    // Ranges and repetitions too large to make.
    ("{{ range(10000000000) }}", "range"),
    ("{% for i in range(0, 9223372036854775807) %}{% endfor %}", "range"),
    ("{{ 'x' * 100000000000 }}", "too large"),
    // Recursion without end: a macro, a recursive loop, a template including itself.
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ("{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}", "recursion"),
    ("{% include 'chat' %}", "template"),
    ("{% extends 'chat' %}", "template"),
    // Names that do not exist, used as things they are not.
    ("{{ nothing.at.all }}", "undefined"),
    ("{{ nothing() }}", "unknown function"),
    ("{{ messages[0].content.no_such_method() }}", "no_such_method"),
    ("{{ messages | no_such_filter }}", "filter"),
    // Errors the template raises, or makes.
    ("{{ raise_exception('this model refuses') }}", "this model refuses"),
    ("{{ 1 // 0 }}", "//"),
    ("{{ 9223372036854775807 * 9223372036854775807 * 9223372036854775807 * 4 }}", "*"),
    // Syntax errors, nesting past the parser's limit.
    ("{% for %}", "syntax"),
    ("{{ messages[0] ", "syntax"),
    ("{% if true %}", "syntax"),
    ("{% endfor %}", "syntax"),
];

#[test]
fn hostile_templates_fail_with_an_error_in_bounded_time() {
    for (source, needle) in HOSTILE {
        let err = run(source, &conversation()).expect_err(source);
        assert!(err.starts_with("chat template: "), "{source}: {err}");
        assert!(err.to_lowercase().contains(needle), "{source}: expected `{needle}` in {err}");
    }
}

#[test]
fn deep_nesting_is_refused_by_the_parser_not_the_stack() {
    for depth in [200, 10_000] {
        let parens = format!("{{{{ {}1{} }}}}", "(".repeat(depth), ")".repeat(depth));
        let lists = format!("{{{{ {}1{} }}}}", "[".repeat(depth), "]".repeat(depth));
        let ifs = format!("{}x{}", "{% if true %}".repeat(depth), "{% endif %}".repeat(depth));
        let fors = format!("{}x{}", "{% for m in messages %}".repeat(depth), "{% endfor %}".repeat(depth));
        let filters = format!("{{{{ 1{} }}}}", "|string".repeat(depth));
        for source in [parens, lists, ifs, fors] {
            let err = run(&source, &conversation()).expect_err("too deep");
            assert!(err.contains("recursion"), "{}: {err}", &source[..40]);
        }
        // A long chain of filters is flat, not deep: it may render.
        let _ = run(&filters, &conversation());
    }
}

#[test]
fn the_fuel_leaves_room_for_large_conversations() {
    // Far more messages than a request body of 8 MiB holds at a realistic size.
    let messages: Vec<ChatMessage> =
        (0..20_000).map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello there")).collect();
    let out = run(CHATML, &messages).expect("a large conversation renders");
    assert_eq!(out.matches("<|im_start|>").count(), messages.len() + 1);
}

/// Pieces of Jinja syntax, some well formed, many not, to put templates together from.
const FRAGMENTS: &[&str] = &[
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "{# ",
    " #}",
    "{%- ",
    " -%}",
    "for m in messages",
    "for i in range(100000)",
    "endfor",
    "if ",
    "elif ",
    "else",
    "endif",
    "macro f(x)",
    "endmacro",
    "f(x)",
    "f(1)",
    "call f(1)",
    "endcall",
    "set x = ",
    "set ns = namespace(n=0)",
    "ns.n",
    "messages",
    "messages[0]",
    "messages[-1]['content']",
    "message.role",
    "loop.index",
    "loop(messages)",
    "recursive",
    "range(",
    "range(10000000000)",
    ")",
    "(",
    "[",
    "]",
    "{",
    "}",
    ":",
    ",",
    "'text'",
    "\"text\"",
    "1",
    "-1",
    "0",
    "1.5e308",
    "9223372036854775807",
    " + ",
    " - ",
    " * ",
    " / ",
    " // ",
    " % ",
    " ** ",
    " ~ ",
    " | ",
    " and ",
    " or ",
    " not ",
    " in ",
    " is ",
    "defined",
    "undefined_name",
    "raise_exception('boom')",
    "bos_token",
    "eos_token",
    "add_generation_prompt",
    "length",
    "upper",
    "trim",
    "tojson",
    "join(',')",
    "items()",
    ".strip()",
    ".split()",
    ".startswith('a')",
    "include 'chat'",
    "extends 'chat'",
    "block b",
    "endblock",
    "raw",
    "endraw",
    "filter upper",
    "endfilter",
    "with a = 1",
    "endwith",
    "break",
    "continue",
    "\n",
    " ",
    "text",
    "<|im_start|>",
    "\u{1F600}",
    "\u{0}",
];

fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40).prop_map(|parts| parts.concat())
}

fn message() -> impl Strategy<Value = ChatMessage> {
    (prop::sample::select(&["system", "user", "assistant", "tool", ""][..]), any::<String>()).prop_map(|(r, c)| ChatMessage::new(r, c))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any template put together from Jinja's pieces compiles or fails, renders or fails: never
    /// a panic, never longer than the bound.
    #[test]
    fn any_template_renders_or_fails_in_bounded_time(source in template(), messages in prop::collection::vec(message(), 0..4)) {
        let _ = run(&source, &messages);
    }

    /// Arbitrary text as a template: the same.
    #[test]
    fn arbitrary_text_as_a_template_never_panics(source in any::<String>()) {
        let _ = run(&source, &conversation());
    }

    /// Messages are data: whatever they contain (template syntax included) renders verbatim.
    #[test]
    fn message_content_is_never_template_code(messages in prop::collection::vec(message(), 1..6)) {
        let out = run(CHATML, &messages).expect("ChatML renders any messages");
        let expected: String = messages.iter().map(|m| format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content)).collect();
        prop_assert_eq!(out, format!("{expected}<|im_start|>assistant\n"));
    }
}
