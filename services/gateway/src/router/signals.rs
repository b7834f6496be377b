//! Signals: what a decision reads of a request to decide whether it takes it. A signal is
//! asynchronous, so that one asking a model (an embedding's similarity to reference texts, a
//! classifier's label) fits beside the keyword signal without changing its callers.

use futures::future::BoxFuture;

use super::config::{KeywordOperator, SignalConfig};

/// The text of a request that signals read.
#[derive(Debug, Clone, Default)]
pub struct RequestText {
    /// The user messages' text, joined by newlines.
    pub user: String,
}

impl RequestText {
    /// From a chat request's body: the text of its `user` messages (string content, or the text
    /// parts of a list).
    pub fn of_chat(body: &serde_json::Value) -> Self {
        let mut user = Vec::new();
        for m in body["messages"].as_array().into_iter().flatten() {
            if m["role"] != "user" {
                continue;
            }
            match &m["content"] {
                serde_json::Value::String(t) => user.push(t.clone()),
                serde_json::Value::Array(parts) => user.extend(parts.iter().filter_map(|p| p["text"].as_str()).map(str::to_string)),
                _ => {}
            }
        }
        Self { user: user.join("\n") }
    }
}

pub trait Signal: Send + Sync {
    /// Its type, as the configuration names it (`keyword`).
    fn kind(&self) -> &'static str;
    /// Whether it fires for this request.
    fn fires<'a>(&'a self, request: &'a RequestText) -> BoxFuture<'a, bool>;
}

/// Fires when the user text holds any (or all) of its keywords.
pub struct Keyword {
    keywords: Vec<String>,
    all: bool,
    case_sensitive: bool,
}

impl Keyword {
    pub fn new(keywords: &[String], operator: KeywordOperator, case_sensitive: bool) -> Self {
        let keywords = keywords.iter().map(|k| if case_sensitive { k.clone() } else { k.to_lowercase() }).collect();
        Self { keywords, all: operator == KeywordOperator::All, case_sensitive }
    }

    fn matches(&self, text: &str) -> bool {
        let lowered;
        let text = if self.case_sensitive {
            text
        } else {
            lowered = text.to_lowercase();
            &lowered
        };
        let mut hits = self.keywords.iter().map(|k| text.contains(k.as_str()));
        if self.all {
            !self.keywords.is_empty() && hits.all(|h| h)
        } else {
            hits.any(|h| h)
        }
    }
}

impl Signal for Keyword {
    fn kind(&self) -> &'static str {
        "keyword"
    }

    fn fires<'a>(&'a self, request: &'a RequestText) -> BoxFuture<'a, bool> {
        Box::pin(std::future::ready(self.matches(&request.user)))
    }
}

/// The signal a configuration entry describes.
pub fn build(cfg: &SignalConfig) -> Box<dyn Signal> {
    match cfg {
        SignalConfig::Keyword { keywords, operator, case_sensitive } => Box::new(Keyword::new(keywords, *operator, *case_sensitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_match_user_text_only() {
        let any = Keyword::new(&["Research".into(), "compare".into()], KeywordOperator::Any, false);
        let all = Keyword::new(&["research".into(), "compare".into()], KeywordOperator::All, false);
        let exact = Keyword::new(&["Research".into()], KeywordOperator::Any, true);
        let body = serde_json::json!({"messages": [
            {"role": "system", "content": "compare everything"},
            {"role": "user", "content": [{"type": "text", "text": "Please RESEARCH this"}]},
        ]});
        let text = RequestText::of_chat(&body);
        assert_eq!(text.user, "Please RESEARCH this");
        assert!(any.matches(&text.user));
        assert!(!all.matches(&text.user), "`compare` is only in the system message");
        assert!(!exact.matches(&text.user));
        assert!(all.matches("research and compare"));
        assert!(!Keyword::new(&[], KeywordOperator::All, false).matches("anything"));
    }
}
