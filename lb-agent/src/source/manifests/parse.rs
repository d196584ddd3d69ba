//! From YAML text to objects: the documents of a file, each with a hash of its text (what
//! change detection keeps instead of the object), and the problems of what does not parse.
use std::hash::{Hash as _, Hasher as _};

use k8s_openapi::serde::{Deserialize as _, de::DeserializeOwned};
use serde_json::Value;
use tracing::debug;

use super::Object;
use crate::translate::Problem;

/// What one text holds: the objects that parsed, and the problems of those that did not.
#[derive(Clone, Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub problems: Vec<Problem>,
}

/// The field a problem names when a file is not YAML at all.
pub(super) const UNREADABLE_FIELD: &str = "(yaml)";

/// Parses the text of one manifest file; `origin` names it in problems.
#[must_use]
pub fn parse_manifest(origin: &str, text: &str) -> ParsedFile {
    parse_documents(origin, text, 0).0
}

/// Parses `text`, a run of whole documents of a file whose first is its document number
/// `first + 1`; also returns how many (non-empty) documents it held. A text that is not
/// all YAML is one problem, and none of its objects is taken.
pub(super) fn parse_documents(origin: &str, text: &str, first: usize) -> (ParsedFile, usize) {
    let mut parsed = ParsedFile::default();
    let documents = match yaml_documents(text) {
        Ok(documents) => documents,
        Err(err) => {
            parsed.problems.push(unreadable(origin, &err));
            return (parsed, 0);
        }
    };
    let count = documents.len();
    for (index, document) in documents.into_iter().enumerate() {
        parse_document(origin, first + index, document, &mut parsed);
    }
    (parsed, count)
}

/// The non-empty documents of `text`, merge keys (`<<: *anchor`) applied as kubectl
/// applies them. libyaml (through `serde_norway`) turns a manifest into JSON values about
/// two and a half times as fast as `serde-saphyr` did (13 against 31–32 ms for 500 Services
/// and their slices), and bounds what hostile input can cost: nesting at 128 levels, and
/// alias expansion.
fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    // Merging needs YAML's own values (a key may be any value); a text without a merge key
    // goes straight to JSON values, which costs a quarter less (13 against 17 ms).
    let merges = text.contains("<<");
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let json = if merges {
            let mut yaml = serde_norway::Value::deserialize(document).map_err(|e| e.to_string())?;
            yaml.apply_merge().map_err(|e| e.to_string())?;
            serde_json::to_value(yaml).map_err(|e| e.to_string())?
        } else {
            Value::deserialize(document).map_err(|e| e.to_string())?
        };
        if !json.is_null() {
            documents.push(json);
        }
    }
    Ok(documents)
}

/// The problem of a text that is not YAML.
pub(super) fn unreadable(origin: &str, error: &str) -> Problem {
    Problem {
        origin: origin.to_string(),
        object: "(file)".to_string(),
        field: UNREADABLE_FIELD.to_string(),
        message: first_line(error),
    }
}

/// Whether `problems` say the text was not YAML at all.
pub(super) fn is_unreadable(problems: &[Problem]) -> bool {
    problems.iter().any(|p| p.field == UNREADABLE_FIELD)
}

fn parse_document(origin: &str, index: usize, document: Value, parsed: &mut ParsedFile) {
    if document.is_null() {
        return;
    }
    let text = |key: &str| {
        document
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    let namespace = document
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let object = format!(
        "{} {namespace}/{name}",
        if kind.is_empty() { "document" } else { &kind }
    );
    let problem = |field: String, message: String| Problem {
        origin: origin.to_string(),
        object: object.clone(),
        field,
        message,
    };
    if api_version.is_empty() || kind.is_empty() {
        let field = if api_version.is_empty() {
            "apiVersion"
        } else {
            "kind"
        };
        parsed.problems.push(problem(
            field.into(),
            format!("missing in document {}", index + 1),
        ));
        return;
    }
    if document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_none()
        && kind != "List"
    {
        parsed
            .problems
            .push(problem("metadata.name".into(), "missing".into()));
        return;
    }
    let result = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => typed(document).map(|o| Object::Service(Box::new(o))),
        ("v1", "Pod") => typed(document).map(|o| Object::Pod(Box::new(o))),
        ("v1", "Node") => typed(document).map(|o| Object::Node(Box::new(o))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            typed(document).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        ("v1", "List") => {
            let items = match document {
                Value::Object(mut map) => map.remove("items"),
                _ => None,
            };
            for item in items
                .and_then(|v| match v {
                    Value::Array(items) => Some(items),
                    _ => None,
                })
                .into_iter()
                .flatten()
            {
                parse_document(origin, index, item, parsed);
            }
            return;
        }
        _ => {
            debug!(origin, %object, api_version, "skipping a kind the load balancer does not use");
            return;
        }
    };
    match result {
        Ok(object) => parsed.objects.push(object),
        Err((field, message)) => parsed.problems.push(problem(field, message)),
    }
}

/// Deserializes into a k8s-openapi type; on failure returns the path of the field.
fn typed<T: DeserializeOwned>(document: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(document).map_err(|err| {
        let path = err.path().to_string();
        (path, first_line(&err.into_inner().to_string()))
    })
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// A run of a file's text holding whole YAML documents (usually one), and a hash of it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunk<'a> {
    pub text: &'a str,
    pub hash: u64,
}

/// Splits a file at its document markers (`---` at the start of a line), so that a file
/// whose documents did not change need not be parsed again: a document's text hashes the
/// same wherever it moved. A `---` at the start of a line always starts a document (YAML
/// forbids it inside scalars); a file with directives (`%YAML`, `%TAG`, which bind to the
/// document after them) stays one chunk.
pub(super) fn split(text: &str) -> Vec<Chunk<'_>> {
    let mut starts = vec![0];
    let mut directives = false;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("---")
            && (rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
            && at > 0
        {
            starts.push(at);
        }
        directives |= line.starts_with('%');
        at += line.len();
    }
    if directives {
        starts.truncate(1);
    }
    starts.push(text.len());
    starts
        .windows(2)
        .map(|w| {
            let text = &text[w[0]..w[1]];
            Chunk {
                text,
                hash: hash(text),
            }
        })
        .collect()
}

pub(super) fn hash(text: &str) -> u64 {
    // SipHash with fixed keys: the same text hashes the same in every run.
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_their_markers_only() {
        let text = "# head\n---\na: 1\n---  \nb: |\n  --- not a marker\n--- {c: 3}\n---";
        let chunks: Vec<&str> = split(text).iter().map(|c| c.text).collect();
        assert_eq!(
            chunks,
            [
                "# head\n",
                "---\na: 1\n",
                "---  \nb: |\n  --- not a marker\n",
                "--- {c: 3}\n",
                "---"
            ]
        );
        assert_eq!(chunks.concat(), text);
        let directives = "%YAML 1.2\n---\na: 1\n---\nb: 2\n";
        assert_eq!(split(directives).len(), 1);
        let same = split("---\na: 1\n---\na: 1\n");
        assert_eq!(same[0].hash, same[1].hash);
    }
}
