//! Structured output: what a request's text must match, read from the request by the gateway
//! (`response_format`, vLLM's `guided_*` and `structured_outputs`) and carried to the workers,
//! which compile it into a grammar that masks the logits at every step.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What the generated text must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against this schema.
    JsonSchema { schema: Value },
    /// Text the regular expression matches whole.
    Regex { pattern: String },
    /// Exactly one of these strings.
    Choice { choices: Vec<String> },
    /// A context-free grammar in Lark syntax (llguidance's dialect).
    Lark { grammar: String },
}

/// The request fields that ask for structured output, as clients send them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OutputFormatFields {
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
}

/// A field that asks for something unreadable: its name (as the client spelled it) and why.
pub type FieldError = (String, String);

fn is_set(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

impl OutputFormatFields {
    /// The one constraint these fields ask for, if any. More than one is refused: which should
    /// win is not the server's guess to make.
    pub fn constraint(&self) -> Result<Option<Constraint>, FieldError> {
        let mut found: Vec<(&str, Constraint)> = Vec::new();
        if let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            if let Some(c) = response_format(rf)? {
                found.push(("response_format", c));
            }
        }
        let guided = [
            ("guided_json", "json", &self.guided_json),
            ("guided_regex", "regex", &self.guided_regex),
            ("guided_choice", "choice", &self.guided_choice),
            ("guided_grammar", "grammar", &self.guided_grammar),
        ];
        for (name, kind, v) in guided {
            if let Some(v) = v.as_ref().filter(|_| is_set(v)) {
                found.push((name, guided_value(name, kind, v)?));
            }
        }
        if let Some(so) = self.structured_outputs.as_ref().filter(|v| !v.is_null()) {
            let obj =
                so.as_object().ok_or_else(|| ("structured_outputs".to_string(), "structured_outputs must be an object".to_string()))?;
            for (key, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
                let kind = match key.as_str() {
                    "json" | "regex" | "choice" | "grammar" => key.as_str(),
                    "json_object" if v.as_bool() == Some(true) => {
                        found.push(("structured_outputs.json_object", Constraint::JsonObject));
                        continue;
                    }
                    "json_object" => continue,
                    other => {
                        return Err((
                            format!("structured_outputs.{other}"),
                            format!("structured_outputs.{other} is not supported; use json, json_object, regex, choice or grammar"),
                        ))
                    }
                };
                found.push(("structured_outputs", guided_value(&format!("structured_outputs.{key}"), kind, v)?));
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, c)| c)),
            _ => {
                let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
                Err((names[1].to_string(), format!("only one output constraint may be given; this request has {}", names.join(", "))))
            }
        }
    }
}

/// OpenAI's `response_format`.
fn response_format(rf: &Value) -> Result<Option<Constraint>, FieldError> {
    let bad = |param: &str, message: &str| (param.to_string(), message.to_string());
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => {
            let spec = rf
                .get("json_schema")
                .filter(|v| v.is_object())
                .ok_or_else(|| bad("response_format.json_schema", "response_format of type json_schema needs a json_schema object"))?;
            let schema = spec.get("schema").cloned().unwrap_or_else(|| json!({}));
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("response_format.json_schema.schema", "the schema must be a JSON Schema object"));
            }
            let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Ok(Some(Constraint::JsonSchema { schema: if strict { closed(schema) } else { schema } }))
        }
        Some(other) => {
            Err(bad("response_format.type", &format!("unknown response_format type `{other}`; use text, json_object or json_schema")))
        }
        None => Err(bad("response_format.type", "response_format needs a type: text, json_object or json_schema")),
    }
}

/// vLLM's `guided_*` value of `kind`, for the field `name`.
fn guided_value(name: &str, kind: &str, v: &Value) -> Result<Constraint, FieldError> {
    let bad = |message: String| (name.to_string(), message);
    match kind {
        "json" => {
            let schema = match v {
                Value::String(s) => serde_json::from_str(s).map_err(|e| bad(format!("{name} is not a JSON schema: {e}")))?,
                other => other.clone(),
            };
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad(format!("{name} must be a JSON Schema object")));
            }
            Ok(Constraint::JsonSchema { schema })
        }
        "regex" => match v.as_str() {
            Some(p) if !p.is_empty() => Ok(Constraint::Regex { pattern: p.to_string() }),
            _ => Err(bad(format!("{name} must be a non-empty regular expression"))),
        },
        "choice" => {
            let choices: Option<Vec<String>> = v.as_array().map(|a| a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect());
            match choices {
                Some(c) if !c.is_empty() && c.len() == v.as_array().map_or(0, Vec::len) => Ok(Constraint::Choice { choices: c }),
                _ => Err(bad(format!("{name} must be a non-empty list of strings"))),
            }
        }
        _ => match v.as_str() {
            Some(g) if !g.trim().is_empty() => Ok(Constraint::Lark { grammar: g.to_string() }),
            _ => Err(bad(format!("{name} must be a grammar in Lark syntax"))),
        },
    }
}

/// OpenAI's `strict`: every object that lists its properties allows no others, at any depth.
fn closed(mut schema: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(o) => {
                if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                    o.insert("additionalProperties".into(), Value::Bool(false));
                }
                o.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut schema);
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<Option<Constraint>, FieldError> {
        serde_json::from_value::<OutputFormatFields>(body).unwrap().constraint()
    }

    #[test]
    fn each_way_of_asking_reads_to_its_constraint() {
        assert_eq!(read(json!({})), Ok(None));
        assert_eq!(read(json!({"response_format": {"type": "text"}})), Ok(None));
        assert_eq!(read(json!({"response_format": {"type": "json_object"}})), Ok(Some(Constraint::JsonObject)));
        let schema = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}});
        let strict =
            read(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}));
        let Ok(Some(Constraint::JsonSchema { schema: s })) = strict else { panic!("{strict:?}") };
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(
            read(json!({"guided_json": "{\"type\": \"string\"}"})),
            Ok(Some(Constraint::JsonSchema { schema: json!({"type": "string"}) }))
        );
        assert_eq!(read(json!({"guided_regex": "[0-9]+"})), Ok(Some(Constraint::Regex { pattern: "[0-9]+".into() })));
        assert_eq!(
            read(json!({"guided_choice": ["yes", "no"]})),
            Ok(Some(Constraint::Choice { choices: vec!["yes".into(), "no".into()] }))
        );
        assert_eq!(
            read(json!({"structured_outputs": {"grammar": "start: \"a\""}})),
            Ok(Some(Constraint::Lark { grammar: "start: \"a\"".into() }))
        );
        assert_eq!(read(json!({"structured_outputs": {"json_object": true}})), Ok(Some(Constraint::JsonObject)));
    }

    #[test]
    fn unreadable_or_conflicting_requests_name_the_field() {
        let param = |body: Value| read(body).unwrap_err().0;
        assert_eq!(param(json!({"response_format": {"type": "yaml"}})), "response_format.type");
        assert_eq!(param(json!({"response_format": {"type": "json_schema"}})), "response_format.json_schema");
        assert_eq!(param(json!({"guided_choice": []})), "guided_choice");
        assert_eq!(param(json!({"guided_choice": ["a", 1]})), "guided_choice");
        assert_eq!(param(json!({"guided_regex": 5})), "guided_regex");
        assert_eq!(param(json!({"guided_json": "{not json"})), "guided_json");
        assert_eq!(param(json!({"structured_outputs": {"xml": "x"}})), "structured_outputs.xml");
        assert_eq!(param(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"})), "guided_regex");
    }

    #[test]
    fn constraints_travel_as_json() {
        for c in [
            Constraint::JsonObject,
            Constraint::Choice { choices: vec!["a".into()] },
            Constraint::JsonSchema { schema: json!({"type": "object"}) },
        ] {
            let back: Constraint = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
    }
}
