//! Tool calls read out of a choice's text as it grows, so a stream can send each call's name as
//! soon as it is written and its arguments fragment by fragment, the way OpenAI streams
//! `delta.tool_calls`.
//!
//! The text is prose until a call begins: a `<tool_call>` tag anywhere (Hermes style), or a JSON
//! object or list as the very first thing in the message (Llama 3 style and forced calls). Prose
//! goes out as soon as it cannot be the start of a tag. A call is committed when its `name` is
//! read and is one of the offered functions; before that, the text is held, and if it turns out
//! not to be a call (broken JSON, an unknown name) it goes out as prose, as the whole-message
//! parse would give it. Once committed, a call's arguments go out as the model writes them: the
//! fragments joined are the arguments' JSON text.

/// What the text pushed so far turned out to be, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text of the message.
    Content(String),
    /// Call `index` (counted from 0 in this message) begins, calling `name`.
    Call { index: usize, name: String },
    /// More of call `index`'s arguments.
    Arguments { index: usize, fragment: String },
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Only whitespace so far: a bare JSON call may still begin.
    Start,
    /// Prose: a `<tool_call>` tag opens a block.
    Text,
    /// Inside a `<tool_call>` block, reading its call object.
    Block,
    /// After a block's call object, before its `</tool_call>`.
    Closing,
    /// A bare JSON call, or a list of them (`list`).
    Bare { list: bool },
    /// In a list, after a call: a comma or the list's end.
    Between,
}

/// The call being read.
#[derive(Debug, Default)]
struct Current {
    /// Its index once its name was read and accepted.
    index: Option<usize>,
    /// Bytes of the raw arguments text given out (for string arguments: 1 once given out whole).
    sent: usize,
}

/// A choice's text, scanned for calls as it arrives.
#[derive(Debug)]
pub struct CallStream {
    names: Vec<String>,
    mode: Mode,
    /// Text not given out yet: in `Text`, a tail that may begin a tag; in `Block` and `Bare`,
    /// the call (or list) so far, from its first character.
    buf: String,
    /// Where the current call object begins in `buf`.
    obj: usize,
    current: Current,
    calls: usize,
}

impl CallStream {
    pub fn new(names: Vec<String>) -> Self {
        Self { names, mode: Mode::Start, buf: String::new(), obj: 0, current: Current::default(), calls: 0 }
    }

    /// How many calls were committed.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// More of the text; what can be said of it already.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.run(&mut out, false);
        out
    }

    /// The text is complete: everything still held goes out.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.run(&mut out, true);
        match self.mode {
            Mode::Block | Mode::Bare { .. } if self.current.index.is_none() => {
                // An unfinished object that never became a call is prose, tag and all.
                let prefix = if self.mode == Mode::Block { OPEN } else { "" };
                content(&mut out, format!("{prefix}{}", self.buf));
            }
            Mode::Closing | Mode::Between | Mode::Block | Mode::Bare { .. } => {}
            Mode::Start | Mode::Text => content(&mut out, std::mem::take(&mut self.buf)),
        }
        self.buf.clear();
        out
    }

    fn run(&mut self, out: &mut Vec<Piece>, end: bool) {
        loop {
            match self.mode {
                Mode::Start => {
                    let trimmed = self.buf.trim_start();
                    if trimmed.is_empty() {
                        return;
                    }
                    if trimmed.starts_with('{') || trimmed.starts_with('[') {
                        self.buf = trimmed.to_string();
                        let list = self.buf.starts_with('[');
                        self.begin(usize::from(list), Mode::Bare { list });
                    } else {
                        self.mode = Mode::Text;
                    }
                }
                Mode::Text => match self.buf.find(OPEN) {
                    Some(at) => {
                        content(out, self.buf[..at].to_string());
                        self.buf.drain(..at + OPEN.len());
                        self.begin(0, Mode::Block);
                    }
                    None => {
                        let keep = if end { 0 } else { tag_prefix(&self.buf) };
                        let give = self.buf.len() - keep;
                        content(out, self.buf[..give].to_string());
                        self.buf.drain(..give);
                        return;
                    }
                },
                Mode::Block | Mode::Bare { .. } => match self.advance(out) {
                    Step::Pending => return,
                    Step::Failed => {
                        // Not a call after all: the held text is prose, and the scan goes on
                        // as prose (a later block may still be a call). A call that broke after
                        // it was committed leaves its raw text as prose too.
                        if self.mode == Mode::Block && self.current.index.is_none() {
                            content(out, OPEN.to_string());
                        }
                        if self.current.index.is_some() {
                            self.buf.drain(..self.obj);
                        }
                        self.mode = Mode::Text;
                    }
                    Step::Done(after) => {
                        self.buf.drain(..after);
                        self.mode = match self.mode {
                            Mode::Block => Mode::Closing,
                            Mode::Bare { list: true } => Mode::Between,
                            _ => Mode::Text,
                        };
                    }
                },
                Mode::Closing => {
                    let t = self.buf.trim_start();
                    if let Some(rest) = t.strip_prefix(CLOSE) {
                        self.buf = rest.to_string();
                    } else if CLOSE.starts_with(t) && !end {
                        return;
                    } else {
                        // No closing tag: what follows is prose.
                        self.buf = t.to_string();
                    }
                    self.mode = Mode::Text;
                }
                Mode::Between => {
                    let t = self.buf.trim_start();
                    if t.is_empty() && !end {
                        return;
                    }
                    if let Some(next) = t.strip_prefix(',') {
                        self.buf = next.to_string();
                        self.begin(0, Mode::Bare { list: true });
                    } else {
                        self.buf = t.strip_prefix(']').unwrap_or(t).to_string();
                        self.mode = Mode::Text;
                    }
                }
            }
        }
    }

    /// A call object begins at `obj` in the buffer.
    fn begin(&mut self, obj: usize, mode: Mode) {
        self.obj = obj;
        self.current = Current::default();
        self.mode = mode;
    }

    /// Reads the current call object as far as the text goes.
    fn advance(&mut self, out: &mut Vec<Piece>) -> Step {
        let text = &self.buf[self.obj..];
        let scan = scan_object(text);
        if scan.broken {
            return Step::Failed;
        }
        if let (Some(name), None) = (&scan.name, self.current.index) {
            if !self.names.iter().any(|n| n == name) {
                return Step::Failed;
            }
            let index = self.calls;
            self.calls += 1;
            self.current.index = Some(index);
            out.push(Piece::Call { index, name: name.clone() });
        }
        let Some(index) = self.current.index else {
            // An object complete without a name is no call.
            return if scan.end.is_some() { Step::Failed } else { Step::Pending };
        };
        if let Some(span) = &scan.args {
            let raw = &text[span.start..span.end.unwrap_or(text.len())];
            if span.string {
                if let (Some(_), 0) = (span.end, self.current.sent) {
                    let decoded: String = serde_json::from_str(raw).unwrap_or_default();
                    out.push(Piece::Arguments { index, fragment: decoded });
                    self.current.sent = 1;
                }
            } else if raw.len() > self.current.sent {
                out.push(Piece::Arguments { index, fragment: raw[self.current.sent..].to_string() });
                self.current.sent = raw.len();
            }
        }
        match scan.end {
            Some(end) => {
                if self.current.sent == 0 {
                    out.push(Piece::Arguments { index, fragment: "{}".into() });
                }
                Step::Done(self.obj + end)
            }
            None => Step::Pending,
        }
    }
}

enum Step {
    Pending,
    Failed,
    /// The call object ended; the offset in the buffer just after it.
    Done(usize),
}

fn content(out: &mut Vec<Piece>, text: String) {
    if text.is_empty() {
        return;
    }
    if let Some(Piece::Content(c)) = out.last_mut() {
        c.push_str(&text);
    } else {
        out.push(Piece::Content(text));
    }
}

/// The length of the longest tail of `s` that is the start of a `<tool_call>` tag.
fn tag_prefix(s: &str) -> usize {
    (1..OPEN.len().min(s.len()) + 1).rev().find(|&n| s.is_char_boundary(s.len() - n) && OPEN.starts_with(&s[s.len() - n..])).unwrap_or(0)
}

/// A value's place in the object's text.
#[derive(Debug)]
struct Span {
    start: usize,
    /// Just past its end, once it is complete.
    end: Option<usize>,
    /// A JSON string (arguments some models write as a string of JSON).
    string: bool,
}

/// What a (possibly unfinished) call object holds so far.
#[derive(Debug, Default)]
struct Scan {
    name: Option<String>,
    args: Option<Span>,
    /// Just past the closing brace, once it came.
    end: Option<usize>,
    /// Not a call object: broken JSON, a name that is not a string, arguments that are not an
    /// object.
    broken: bool,
}

fn scan_object(s: &str) -> Scan {
    let b = s.as_bytes();
    let mut scan = Scan::default();
    let broken = || Scan { broken: true, ..Default::default() };
    let mut i = skip_ws(b, 0);
    if i == b.len() {
        return scan;
    }
    if b[i] != b'{' {
        return broken();
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        let Some(&c) = b.get(i) else { return scan };
        match c {
            b'}' => {
                scan.end = Some(i + 1);
                return scan;
            }
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return broken(),
        }
        let Some(key_end) = string_end(b, i) else { return scan };
        let Ok(key) = serde_json::from_str::<String>(&s[i..key_end]) else { return broken() };
        i = skip_ws(b, key_end);
        let Some(&colon) = b.get(i) else { return scan };
        if colon != b':' {
            return broken();
        }
        i = skip_ws(b, i + 1);
        let Some(&first) = b.get(i) else { return scan };
        let is_args = key == "arguments" || (key == "parameters" && scan.args.is_none());
        if is_args && first != b'{' && first != b'"' {
            return broken();
        }
        let end = match value_end(b, i) {
            Err(()) => return broken(),
            Ok(end) => end,
        };
        if is_args {
            scan.args = Some(Span { start: i, end, string: first == b'"' });
        } else if key == "name" {
            if first != b'"' {
                return broken();
            }
            if let Some(e) = end {
                match serde_json::from_str::<String>(&s[i..e]) {
                    Ok(n) => scan.name = Some(n),
                    Err(_) => return broken(),
                }
            }
        }
        match end {
            Some(e) => i = e,
            None => return scan,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Just past the string starting at `b[i]` (a quote), or `None` if it is not closed yet.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// Just past the JSON value starting at `b[i]`, `None` while it is unfinished; `Err` when the
/// brackets do not match.
fn value_end(b: &[u8], i: usize) -> Result<Option<usize>, ()> {
    match b[i] {
        b'"' => Ok(string_end(b, i)),
        b'{' | b'[' => {
            let mut stack = Vec::new();
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => match string_end(b, j) {
                        Some(e) => {
                            j = e;
                            continue;
                        }
                        None => return Ok(None),
                    },
                    b'{' => stack.push(b'}'),
                    b'[' => stack.push(b']'),
                    c @ (b'}' | b']') => {
                        if stack.pop() != Some(c) {
                            return Err(());
                        }
                        if stack.is_empty() {
                            return Ok(Some(j + 1));
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Ok(None)
        }
        _ => {
            // A scalar: it ends where a delimiter comes; at the end of the text it may go on.
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']') && !b[j].is_ascii_whitespace() {
                j += 1;
            }
            Ok((j < b.len()).then_some(j))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    /// Pushes `text` in pieces of `step` characters; the pieces, merged where they continue each
    /// other, and how many pushes gave out arguments.
    fn run(text: &str, step: usize) -> (Vec<Piece>, usize) {
        let mut s = CallStream::new(names());
        let chars: Vec<char> = text.chars().collect();
        let (mut all, mut arg_pushes) = (Vec::new(), 0);
        for chunk in chars.chunks(step) {
            let got = s.push(&chunk.iter().collect::<String>());
            arg_pushes += usize::from(got.iter().any(|p| matches!(p, Piece::Arguments { .. })));
            all.extend(got);
        }
        all.extend(s.finish());
        (merge(all), arg_pushes)
    }

    fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                (Some(Piece::Arguments { index: i, fragment: a }), Piece::Arguments { index: j, fragment: b }) if *i == j => a.push_str(&b),
                (_, p) => out.push(p),
            }
        }
        out
    }

    fn call(index: usize, name: &str) -> Piece {
        Piece::Call { index, name: name.into() }
    }

    fn args(index: usize, fragment: &str) -> Piece {
        Piece::Arguments { index, fragment: fragment.into() }
    }

    #[test]
    fn a_hermes_block_streams_its_arguments_in_fragments() {
        let text =
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"days\": [1, 2]}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (pieces, pushes) = run(text, step);
            assert_eq!(
                pieces,
                vec![Piece::Content("Let me check.\n".into()), call(0, "get_weather"), args(0, r#"{"city": "Oslo", "days": [1, 2]}"#)],
                "step {step}"
            );
            if step <= 3 {
                assert!(pushes > 5, "arguments came in {pushes} pushes at step {step}");
            }
        }
    }

    #[test]
    fn prose_goes_out_at_once_but_a_tag_start_is_held() {
        let mut s = CallStream::new(names());
        assert_eq!(s.push("It is sunny <tool"), vec![Piece::Content("It is sunny ".into())]);
        assert_eq!(s.push("box> too"), vec![Piece::Content("<toolbox> too".into())]);
        assert_eq!(s.finish(), vec![]);
        assert_eq!(s.calls(), 0);
    }

    #[test]
    fn bare_calls_and_lists_of_them() {
        let (p, _) = run(r#"{"name": "add", "parameters": {"a": 1, "b": 2}}"#, 2);
        assert_eq!(p, vec![call(0, "add"), args(0, r#"{"a": 1, "b": 2}"#)]);
        let (p, _) = run(r#" [{"name": "add", "arguments": {}}, {"arguments": "{\"city\": \"Rome\"}", "name": "get_weather"}]"#, 3);
        assert_eq!(p, vec![call(0, "add"), args(0, "{}"), call(1, "get_weather"), args(1, r#"{"city": "Rome"}"#)]);
        // Arguments before the name go out once the name is read; no arguments at all are `{}`.
        let (p, _) = run(r#"{"arguments": {"x": "}"}, "name": "add"}"#, 1);
        assert_eq!(p, vec![call(0, "add"), args(0, r#"{"x": "}"}"#)]);
        let (p, _) = run(r#"{"name": "add"}"#, 1);
        assert_eq!(p, vec![call(0, "add"), args(0, "{}")]);
    }

    #[test]
    fn what_is_not_a_call_comes_out_as_prose() {
        for text in [
            r#"{"name": "delete_all", "arguments": {}}"#,
            "<tool_call>{oops</tool_call> and more",
            r#"{"answer": 42}"#,
            r#"{"name": 7}"#,
            "<tool_call>{\"name\": \"ad",
        ] {
            for step in [1, 4, 100] {
                let (p, _) = run(text, step);
                assert_eq!(p, vec![Piece::Content(text.to_string())], "{text} at step {step}");
            }
        }
    }

    #[test]
    fn prose_after_a_block_and_a_second_block() {
        let text = "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}}</tool_call> then <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 2}}";
        let (p, _) = run(text, 5);
        assert_eq!(
            p,
            vec![call(0, "add"), args(0, r#"{"a": 1}"#), Piece::Content(" then ".into()), call(1, "add"), args(1, r#"{"a": 2}"#)]
        );
    }
}
