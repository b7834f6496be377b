//! Tool calls (OpenAI's `tools` and `tool_choice`): the functions a request offers, the output
//! constraint a forced call becomes, and the calls read back out of the model's text.
//!
//! A call is written by the model in one of the formats model families use: Hermes-style
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (Qwen, Hermes, and what the
//! gateway asks for when a chat template knows no tools), or a bare JSON object (or list of them)
//! with `name` and `arguments` (or Llama 3's `parameters`). A forced call (`required`, or a named
//! function) is constrained to that JSON, so it always parses and fits the function's schema.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::Constraint;

pub mod stream;
pub use stream::{CallStream, Piece};

/// One function a request offers.
#[derive(Debug, Clone, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema of the arguments object; absent: any object.
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// `tools` and `tool_choice` read and checked against each other; errors name the field.
pub fn read_tools(tools: Option<&Value>, choice: Option<&Value>) -> Result<(Vec<Tool>, ToolChoice), (String, String)> {
    let bad = |p: &str, m: String| (p.to_string(), m);
    let tools: Vec<Tool> = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| bad("tools", format!("tools must be a list of {{type, function: {{name, parameters}}}}: {e}")))?,
    };
    for (i, t) in tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(&format!("tools[{i}].type"), format!("tool type `{}` is not supported; use function", t.kind)));
        }
        if t.function.name.is_empty() {
            return Err(bad(&format!("tools[{i}].function.name"), "a function needs a name".into()));
        }
        if let Some(p) = &t.function.parameters {
            if !p.is_object() {
                return Err(bad(&format!("tools[{i}].function.parameters"), "parameters must be a JSON Schema object".into()));
            }
        }
    }
    let choice = match choice {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(bad("tool_choice", format!("unknown tool_choice `{other}`; use none, auto, required or a function"))),
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(Value::as_str).ok_or_else(|| {
                bad("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}".into())
            })?;
            ToolChoice::Named(name.to_string())
        }
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Auto if tools.is_empty() => {
            Err(bad("tool_choice", "tool_choice asks for a tool call, but the request offers no tools".into()))
        }
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.function.name == n) => {
            Err(bad("tool_choice", format!("tool_choice names `{n}`, which is not among the tools")))
        }
        _ => Ok((tools, choice)),
    }
}

fn call_schema(t: &Tool) -> Value {
    let params = t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object"}));
    json!({
        "type": "object",
        "properties": {"name": {"const": t.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

/// The output constraint of a forced call: one JSON call of the named function, or of any of
/// the tools for `required`. `None` when the model chooses (`auto`) or may not call (`none`).
pub fn forced_call(tools: &[Tool], choice: &ToolChoice) -> Option<Constraint> {
    let schema = match choice {
        ToolChoice::Named(n) => call_schema(tools.iter().find(|t| &t.function.name == n)?),
        ToolChoice::Required => json!({"anyOf": tools.iter().map(call_schema).collect::<Vec<_>>()}),
        ToolChoice::None | ToolChoice::Auto => return None,
    };
    Some(Constraint::JsonSchema { schema })
}

/// Instructions for a model whose chat template does not take `tools`: the functions, and the
/// Hermes-style format to call them in.
pub fn tools_prompt(tools: &[Tool]) -> String {
    let mut s = String::from("You can call functions. The functions, as JSON schemas, are listed in <tools></tools>:\n<tools>\n");
    for t in tools {
        let f = json!({"name": t.function.name, "description": t.function.description, "parameters": t.function.parameters});
        s.push_str(&f.to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, answer with one <tool_call></tool_call> block per call, each holding a JSON object \
         with the function's name and its arguments:\n<tool_call>\n{\"name\": \"...\", \"arguments\": {...}}\n</tool_call>",
    );
    s
}

/// A call read from the model's text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

/// The calls in `text`, and the text outside them (`None` when there is none). `None` when the
/// text holds no call of one of `tools`: it is an ordinary answer. The same reading as a stream's
/// ([`CallStream`]), on the whole text at once; arguments that are valid JSON come back compact.
pub fn parse_calls(text: &str, tools: &[Tool]) -> Option<(Option<String>, Vec<ParsedCall>)> {
    let mut stream = CallStream::new(tools.iter().map(|t| t.function.name.clone()).collect());
    let mut pieces = stream.push(text);
    pieces.extend(stream.finish());
    let (mut rest, mut calls) = (String::new(), Vec::<ParsedCall>::new());
    for p in pieces {
        match p {
            Piece::Content(c) => rest.push_str(&c),
            Piece::Call { name, .. } => calls.push(ParsedCall { name, arguments: String::new() }),
            Piece::Arguments { index, fragment } => calls[index].arguments.push_str(&fragment),
        }
    }
    for c in &mut calls {
        if let Ok(v) = serde_json::from_str::<Value>(&c.arguments) {
            c.arguments = v.to_string();
        }
    }
    let rest = rest.trim();
    (!calls.is_empty()).then(|| ((!rest.is_empty()).then(|| rest.to_string()), calls))
}

/// A call as OpenAI returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A call in a stream chunk: its place among the choice's calls, then its parts. The first
/// chunk of a call has its id, type and name (and empty arguments); later ones carry only more
/// of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

impl ToolCallDelta {
    /// Call `index` opens: its id and name.
    pub fn opening(index: usize, id: String, name: String) -> Self {
        Self { index, id: Some(id), kind: Some("function"), function: FunctionDelta { name: Some(name), arguments: String::new() } }
    }

    /// More of call `index`'s arguments.
    pub fn arguments(index: usize, fragment: String) -> Self {
        Self { index, id: None, kind: None, function: FunctionDelta { name: None, arguments: fragment } }
    }
}

impl ToolCall {
    pub fn new(id: String, call: ParsedCall) -> Self {
        Self { id, kind: "function", function: FunctionCall { name: call.name, arguments: call.arguments } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        let v = json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add"}}
        ]);
        read_tools(Some(&v), None).unwrap().0
    }

    #[test]
    fn reads_choices_and_refuses_what_cannot_be() {
        let t = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(read_tools(Some(&t), None).unwrap().1, ToolChoice::Auto);
        assert_eq!(read_tools(None, None).unwrap().1, ToolChoice::None);
        assert_eq!(read_tools(Some(&t), Some(&json!("required"))).unwrap().1, ToolChoice::Required);
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(read_tools(Some(&t), Some(&named)).unwrap().1, ToolChoice::Named("f".into()));
        let err = |tools: Option<&Value>, choice: Value| read_tools(tools, Some(&choice)).unwrap_err().0;
        assert_eq!(err(Some(&t), json!({"type": "function", "function": {"name": "g"}})), "tool_choice");
        assert_eq!(err(None, json!("required")), "tool_choice");
        assert_eq!(err(Some(&t), json!("sometimes")), "tool_choice");
        assert_eq!(err(Some(&json!([{"type": "retrieval", "function": {"name": "f"}}])), json!("auto")), "tools[0].type");
    }

    #[test]
    fn parses_the_formats_models_write() {
        let t = tools();
        let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let (rest, calls) = parse_calls(hermes, &t).unwrap();
        assert_eq!(rest.as_deref(), Some("Let me check."));
        assert_eq!(calls, vec![ParsedCall { name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() }]);
        let llama = r#"{"name": "add", "parameters": {"a": 1}}"#;
        assert_eq!(parse_calls(llama, &t).unwrap().1[0].arguments, r#"{"a":1}"#);
        let two = r#"[{"name": "add", "arguments": {}}, {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}]"#;
        assert_eq!(parse_calls(two, &t).unwrap().1.len(), 2);
        // Not calls: prose, JSON that names no offered tool, a broken block.
        assert_eq!(parse_calls("It is sunny.", &t), None);
        assert_eq!(parse_calls(r#"{"name": "delete_all", "arguments": {}}"#, &t), None);
        assert_eq!(parse_calls("<tool_call>{oops</tool_call>", &t), None);
    }

    #[test]
    fn a_forced_call_is_a_schema_of_the_call() {
        let t = tools();
        let Some(Constraint::JsonSchema { schema }) = forced_call(&t, &ToolChoice::Named("get_weather".into())) else { panic!() };
        assert_eq!(schema["properties"]["name"]["const"], "get_weather");
        assert_eq!(schema["properties"]["arguments"]["required"][0], "city");
        let Some(Constraint::JsonSchema { schema }) = forced_call(&t, &ToolChoice::Required) else { panic!() };
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(forced_call(&t, &ToolChoice::Auto), None);
    }
}
