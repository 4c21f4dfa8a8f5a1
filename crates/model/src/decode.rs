//! Manifest decoding: text in the forms users write (YAML streams, JSON objects or arrays, `List` wrappers)
//! into raw [`Resource`]s, with errors that say which document, where, and which field.
//!
//! Decoding checks only the shape of the envelope (`apiVersion`, `kind`, `metadata`, `spec`, `status`);
//! [`crate::normalize`] checks the rest. Nesting depth is bounded by the parsers' recursion limits (128 levels
//! in both serde_json and serde_yaml), so hostile input cannot exhaust the stack.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::names::{index, render_path};
use crate::Resource;

/// Why a manifest text could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DecodeError {
    /// The document (1-based) of a YAML stream or a stream of JSON values; 1 for a single document.
    pub document: usize,
    /// For syntax errors: the 1-based line in the whole text.
    pub line: Option<usize>,
    /// For syntax errors: the 1-based column.
    pub column: Option<usize>,
    /// For shape errors: the path of the offending field within the document (`metadata`, `items[2].kind`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ", line {line}, column {column}")?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl DecodeError {
    fn shape(document: usize, path: String, message: impl Into<String>) -> Self {
        Self {
            document,
            line: None,
            column: None,
            path,
            message: message.into(),
        }
    }

    fn syntax(document: usize, line: usize, column: usize, message: String) -> Self {
        // The parsers put " at line L column C" into the message; the location has its own fields here.
        let message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
        Self {
            document,
            line: Some(line),
            column: Some(column),
            path: String::new(),
            message,
        }
    }
}

/// A `List` wrapper as `kubectl` writes it: `{"apiVersion": "v1", "kind": "List", "items": [...]}`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListWrapper {
    #[serde(default, rename = "apiVersion")]
    _api_version: Option<String>,
    #[serde(default, rename = "kind")]
    _kind: Option<String>,
    #[serde(default, rename = "metadata")]
    _metadata: Option<Value>,
    items: Vec<Value>,
}

/// Decodes every resource in `text`: a YAML stream (documents separated by `---`), one or more JSON values,
/// where each document is a resource, an array of resources, or a `List` wrapper (`{"kind": "List",
/// "items": [...]}` or just `{"items": [...]}`). Empty documents are skipped; unknown fields in the envelope
/// are errors. Stops at the first error.
pub fn decode_manifests(text: &str) -> Result<Vec<Resource>, DecodeError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    let documents = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON, or a YAML flow collection: JSON gives the better errors, so it goes first.
        match json_documents(text) {
            Ok(docs) => docs,
            Err(json_err) => yaml_documents(text).map_err(|_| json_err)?,
        }
    } else {
        yaml_documents(text)?
    };
    let mut out = Vec::new();
    for (i, doc) in documents.into_iter().enumerate() {
        collect(i + 1, doc, &mut out)?;
    }
    Ok(out)
}

fn json_documents(text: &str) -> Result<Vec<Value>, DecodeError> {
    let mut docs = Vec::new();
    for (i, doc) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        docs.push(
            doc.map_err(|e| DecodeError::syntax(i + 1, e.line(), e.column(), e.to_string()))?,
        );
    }
    Ok(docs)
}

/// The deepest nesting a document may have; the same as the parsers' recursion limits.
pub const MAX_DEPTH: usize = 128;

fn yaml_documents(text: &str) -> Result<Vec<Value>, DecodeError> {
    check_flow_depth(text)?;
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = Value::deserialize(de).map_err(|e| match e.location() {
            Some(loc) => DecodeError::syntax(i + 1, loc.line(), loc.column(), e.to_string()),
            None => DecodeError::shape(i + 1, String::new(), e.to_string()),
        })?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Refuses text with more than [`MAX_DEPTH`] unclosed `[`/`{` before handing it to the YAML parser, whose
/// time grows with the square of the flow nesting depth (libyaml re-checks every open flow level for each
/// token). Quotes are not considered, so this over-counts brackets inside strings; only text with more than
/// 128 unbalanced brackets in string values is refused wrongly.
fn check_flow_depth(text: &str) -> Result<(), DecodeError> {
    // Documents are counted by their `---` markers; the first document may or may not have one.
    let first_has_marker = text
        .lines()
        .find(|l| !(l.trim().is_empty() || l.starts_with('#')))
        .is_some_and(|l| l.starts_with("---"));
    let mut markers = usize::from(text.starts_with("---"));
    let (mut depth, mut line, mut column) = (0usize, 1, 0);
    for (i, c) in text.char_indices() {
        column += 1;
        match c {
            '\n' => {
                line += 1;
                column = 0;
                markers += usize::from(text[i + 1..].starts_with("---"));
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    let document = (markers + usize::from(!first_has_marker)).max(1);
                    let message = format!("nesting is deeper than {MAX_DEPTH} levels");
                    return Err(DecodeError {
                        document,
                        line: Some(line),
                        column: Some(column),
                        path: String::new(),
                        message,
                    });
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn collect(document: usize, doc: Value, out: &mut Vec<Resource>) -> Result<(), DecodeError> {
    match doc {
        Value::Null => Ok(()),
        Value::Array(items) => items_into(document, "", items, out),
        Value::Object(ref map) if is_list(map) => {
            let list: ListWrapper = serde_path_to_error::deserialize(doc).map_err(|e| {
                DecodeError::shape(
                    document,
                    render_path("", e.path()),
                    e.into_inner().to_string(),
                )
            })?;
            items_into(document, "items", list.items, out)
        }
        other => {
            out.push(resource(document, String::new(), other)?);
            Ok(())
        }
    }
}

fn is_list(map: &serde_json::Map<String, Value>) -> bool {
    match map.get("kind") {
        Some(kind) => kind == "List",
        None => map.contains_key("items"),
    }
}

fn items_into(
    document: usize,
    base: &str,
    items: Vec<Value>,
    out: &mut Vec<Resource>,
) -> Result<(), DecodeError> {
    for (i, item) in items.into_iter().enumerate() {
        out.push(resource(document, index(base, i), item)?);
    }
    Ok(())
}

fn resource(document: usize, path: String, v: Value) -> Result<Resource, DecodeError> {
    if !v.is_object() {
        let got = match v {
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "a mapping",
        };
        return Err(DecodeError::shape(
            document,
            path,
            format!("expected a resource (a mapping with apiVersion, kind, metadata and spec), got {got}"),
        ));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = render_path(&path, e.path());
        DecodeError::shape(document, path, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str =
        r#"{"apiVersion": "kiln.dev/v1", "kind": "Environment", "metadata": {"name": "e"}}"#;

    fn names(text: &str) -> Vec<String> {
        match decode_manifests(text) {
            Ok(rs) => rs.into_iter().map(|r| r.metadata.name).collect(),
            Err(e) => panic!("{text}: {e}"),
        }
    }

    fn error(text: &str) -> String {
        decode_manifests(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn accepts_every_form() {
        let yaml = "---\n# nothing\n---\napiVersion: kiln.dev/v1\nkind: Project\nmetadata: {name: a}\n---\n---\n\
                    apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {name: b}\n";
        assert_eq!(names(yaml), ["a", "b"]);
        assert_eq!(names(ENV), ["e"]);
        assert_eq!(names(&format!("[{ENV}, {ENV}]")), ["e", "e"]);
        assert_eq!(names(&format!("{ENV}\n{ENV}")), ["e", "e"]);
        assert_eq!(
            names(&format!(
                r#"{{"kind": "List", "apiVersion": "v1", "items": [{ENV}]}}"#
            )),
            ["e"]
        );
        assert_eq!(names(&format!(r#"{{"items": [{ENV}]}}"#)), ["e"]);
        assert_eq!(
            names("{apiVersion: kiln.dev/v1, kind: Project, metadata: {name: flow}}"),
            ["flow"]
        );
        assert_eq!(names(&format!("\u{feff}{ENV}")), ["e"]);
        assert_eq!(names(""), Vec::<String>::new());
        assert_eq!(names("# only a comment\n"), Vec::<String>::new());
        assert_eq!(names("[]"), Vec::<String>::new());
    }

    #[test]
    fn errors_name_document_location_and_path() {
        assert_eq!(
            error(&format!("{ENV}\n{{\"kind\": 1,")),
            "document 2, line 2, column 11: EOF while parsing a value"
        );
        assert_eq!(
            error("apiVersion: kiln.dev/v1\nkind: [a\n"),
            "document 1, line 3, column 1: did not find expected ',' or ']', while parsing a flow sequence at line 2 column 7"
        );
        assert_eq!(
            error(&format!("{ENV}\n---\nkind: Project\napiVersion: kiln.dev/v1\nmetadata: {{nme: x}}\n")),
            "document 2: metadata.nme: unknown field `nme`, expected one of `name`, `organization`, `project`, \
             `labels`, `annotations`, `uid`, `resourceVersion`, `generation`, `creationTimestamp`, \
             `deletionTimestamp`, `finalizers`"
        );
        assert_eq!(
            error(&format!(r#"{{"items": [{ENV}, {{"kind": "Project"}}]}}"#)),
            "document 1: items[1]: missing field `apiVersion`"
        );
        assert_eq!(
            error(&format!("[{ENV}, 3]")),
            "document 1: [1]: expected a resource (a mapping with apiVersion, kind, metadata and spec), got a number"
        );
        assert_eq!(
            error(r#"{"kind": "List"}"#),
            "document 1: missing field `items`"
        );
    }

    #[test]
    fn refuses_deep_flow_nesting_with_its_location() {
        let text = format!("apiVersion: kiln.dev/v1\n---\nspec: {}", "[".repeat(200));
        let err = decode_manifests(&text).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("document 2, line 3, column 135: nesting is deeper than 128 levels".into())
        );
        let nested = ["[{}]"; 500].join(", ");
        let fine = format!(
            "apiVersion: kiln.dev/v1\nkind: Project\nmetadata: {{name: a}}\nspec: [{nested}]"
        );
        assert!(decode_manifests(&fine).is_ok());
    }
}
