//! Label and field selectors, with the syntax and matching rules of
//! `k8s.io/apimachinery/pkg/labels` and `.../fields`.
//!
//! Label selectors support equality (`a=b`, `a==b`), inequality (`a!=b`, which also matches
//! objects *without* the label), existence (`a`), non-existence (`!a`), set membership
//! (`a in (x,y)`, `a notin (x,y)`; `notin` also matches objects without the label) and the
//! integer comparisons `a>1` / `a<1`. Requirements are comma-separated and AND-ed.
//!
//! Field selectors support `field=value`, `field==value` and `field!=value` on
//! `metadata.name` and `metadata.namespace` (the fields every resource supports); any other
//! field is rejected, as the real server rejects unsupported field labels.

use std::collections::BTreeMap;

/// A selector that could not be parsed (the server answers 400 Bad Request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
            Op::Equals(v) => value == Some(v),
            Op::NotEquals(v) => value != Some(v),
            Op::In(set) => value.is_some_and(|v| set.contains(v)),
            Op::NotIn(set) => value.is_none_or(|v| !set.contains(v)),
            Op::GreaterThan(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Op::LessThan(n) => value
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        }
    }
}

/// A parsed label selector: a conjunction of requirements. The empty selector matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses a selector in the Kubernetes string syntax (`a=b,!c,d in (e,f)`).
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let tokens = lex(input)?;
        Parser { tokens, pos: 0 }.parse()
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Equals,
    DoubleEquals,
    NotEquals,
    Bang,
    Greater,
    Less,
    OpenParen,
    CloseParen,
    Comma,
}

fn is_special(c: char) -> bool {
    matches!(c, '(' | ')' | ',' | '=' | '!' | '<' | '>')
}

fn lex(input: &str) -> Result<Vec<Token>, SelectorError> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        chars.next();
        let token = match c {
            '(' => Token::OpenParen,
            ')' => Token::CloseParen,
            ',' => Token::Comma,
            '<' => Token::Less,
            '>' => Token::Greater,
            '=' => {
                if chars.peek() == Some(&'=') {
                    chars.next();
                    Token::DoubleEquals
                } else {
                    Token::Equals
                }
            }
            '!' => {
                if chars.peek() == Some(&'=') {
                    chars.next();
                    Token::NotEquals
                } else {
                    Token::Bang
                }
            }
            first => {
                let mut ident = String::from(first);
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || is_special(c) {
                        break;
                    }
                    ident.push(c);
                    chars.next();
                }
                Token::Ident(ident)
            }
        };
        tokens.push(token);
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn at_requirement_end(&self) -> bool {
        matches!(self.peek(), None | Some(Token::Comma))
    }

    fn parse(mut self) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if self.peek().is_none() {
            return Ok(LabelSelector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            match self.next() {
                None => break,
                Some(Token::Comma) => {
                    if self.peek().is_none() {
                        return Err(err("found end of input, expected a requirement after ','"));
                    }
                }
                Some(t) => return Err(err(format!("found {t:?}, expected ',' or end of input"))),
            }
        }
        Ok(LabelSelector { requirements })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.next() {
            Some(Token::Ident(key)) => {
                validate_key(&key)?;
                Ok(key)
            }
            other => Err(err(format!("found {other:?}, expected a label key"))),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek() == Some(&Token::Bang) {
            self.next();
            let key = self.key()?;
            if !self.at_requirement_end() {
                return Err(err(format!("unexpected token after !{key}")));
            }
            return Ok(Requirement {
                key,
                op: Op::NotExists,
            });
        }
        let key = self.key()?;
        if self.at_requirement_end() {
            return Ok(Requirement {
                key,
                op: Op::Exists,
            });
        }
        let op = match self.next() {
            Some(Token::Equals | Token::DoubleEquals) => Op::Equals(self.single_value()?),
            Some(Token::NotEquals) => Op::NotEquals(self.single_value()?),
            Some(Token::Greater) => Op::GreaterThan(self.integer()?),
            Some(Token::Less) => Op::LessThan(self.integer()?),
            Some(Token::Ident(word)) if word == "in" => Op::In(self.value_set()?),
            Some(Token::Ident(word)) if word == "notin" => Op::NotIn(self.value_set()?),
            other => {
                return Err(err(format!(
                    "found {other:?}, expected an operator after {key}"
                )));
            }
        };
        Ok(Requirement { key, op })
    }

    fn single_value(&mut self) -> Result<String, SelectorError> {
        if self.at_requirement_end() {
            return Ok(String::new());
        }
        match self.next() {
            Some(Token::Ident(v)) => {
                validate_value(&v)?;
                Ok(v)
            }
            other => Err(err(format!("found {other:?}, expected a value"))),
        }
    }

    fn integer(&mut self) -> Result<i64, SelectorError> {
        match self.next() {
            Some(Token::Ident(v)) => v
                .parse()
                .map_err(|_| err(format!("{v:?} is not an integer"))),
            other => Err(err(format!("found {other:?}, expected an integer"))),
        }
    }

    fn value_set(&mut self) -> Result<Vec<String>, SelectorError> {
        if self.next() != Some(Token::OpenParen) {
            return Err(err("expected '(' after set operator"));
        }
        let mut values = Vec::new();
        let mut expect_value = true;
        loop {
            match self.next() {
                Some(Token::Ident(v)) if expect_value => {
                    validate_value(&v)?;
                    values.push(v);
                    expect_value = false;
                }
                Some(Token::Comma) => {
                    if expect_value {
                        values.push(String::new());
                    }
                    expect_value = true;
                }
                Some(Token::CloseParen) => {
                    if expect_value && !values.is_empty() {
                        values.push(String::new());
                    }
                    break;
                }
                other => return Err(err(format!("found {other:?} in value set"))),
            }
        }
        if values.is_empty() {
            return Err(err(
                "for 'in', 'notin' operators, values set can't be empty",
            ));
        }
        Ok(values)
    }
}

fn err(msg: impl Into<String>) -> SelectorError {
    SelectorError(format!("unable to parse requirement: {}", msg.into()))
}

/// A qualified name: `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn is_qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    if prefix_ok && is_qualified_name_part(name) {
        Ok(())
    } else {
        Err(err(format!("invalid label key {key:?}")))
    }
}

fn validate_value(value: &str) -> Result<(), SelectorError> {
    if value.is_empty() || is_qualified_name_part(value) {
        Ok(())
    } else {
        Err(err(format!("invalid label value {value:?}")))
    }
}

/// The fields a field selector may use.
pub const SUPPORTED_FIELDS: [&str; 2] = ["metadata.name", "metadata.namespace"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    field: String,
    equals: bool,
    value: String,
}

/// A parsed field selector over `metadata.name` / `metadata.namespace`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses `field=value,field!=value` (backslash escapes `\,`, `\=`, `\\` are honoured).
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in split_unescaped(input, ',') {
            if term.trim().is_empty() {
                continue;
            }
            let (field, equals, value) = if let Some(i) = find_unescaped(&term, "!=") {
                (&term[..i], false, &term[i + 2..])
            } else if let Some(i) = find_unescaped(&term, "==") {
                (&term[..i], true, &term[i + 2..])
            } else if let Some(i) = find_unescaped(&term, "=") {
                (&term[..i], true, &term[i + 1..])
            } else {
                return Err(SelectorError(format!("invalid field selector: {term:?}")));
            };
            let field = field.trim();
            if !SUPPORTED_FIELDS.contains(&field) {
                return Err(SelectorError(format!("field label not supported: {field}")));
            }
            requirements.push(FieldRequirement {
                field: field.to_string(),
                equals,
                value: unescape(value.trim()),
            });
        }
        Ok(FieldSelector { requirements })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with this namespace and name is selected.
    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        self.requirements.iter().all(|r| {
            let actual = match r.field.as_str() {
                "metadata.name" => name,
                _ => namespace,
            };
            (actual == r.value) == r.equals
        })
    }
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        let last = parts.last_mut().expect("parts is never empty");
        if escaped {
            last.push('\\');
            last.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            last.push(c);
        }
    }
    parts
}

fn find_unescaped(s: &str, pat: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if s[i..].starts_with(pat) {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn empty_matches_everything() {
        assert!(sel("").matches(&labels(&[])));
        assert!(sel("  ").is_empty());
    }

    #[test]
    fn equality_and_inequality() {
        let l = labels(&[("app", "web"), ("tier", "fe")]);
        assert!(sel("app=web").matches(&l));
        assert!(sel("app==web").matches(&l));
        assert!(!sel("app=db").matches(&l));
        assert!(sel("app!=db").matches(&l));
        assert!(!sel("app!=web").matches(&l));
        // != matches objects without the label.
        assert!(sel("missing!=x").matches(&l));
        assert!(sel("app=web,tier=fe").matches(&l));
        assert!(!sel("app=web,tier=be").matches(&l));
        assert!(sel(" app = web , tier == fe ").matches(&l));
        // Empty value.
        assert!(sel("empty=").matches(&labels(&[("empty", "")])));
        assert!(!sel("empty=").matches(&l));
    }

    #[test]
    fn existence() {
        let l = labels(&[("service.kubernetes.io/headless", "")]);
        assert!(sel("service.kubernetes.io/headless").matches(&l));
        assert!(!sel("!service.kubernetes.io/headless").matches(&l));
        assert!(sel("!service.kubernetes.io/service-proxy-name").matches(&l));
        let both = sel("!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless");
        assert!(!both.matches(&l));
        assert!(both.matches(&labels(&[("app", "x")])));
        assert!(!both.matches(&labels(&[(
            "service.kubernetes.io/service-proxy-name",
            "foo"
        )])));
    }

    #[test]
    fn sets_and_comparisons() {
        let l = labels(&[("env", "prod"), ("n", "5")]);
        assert!(sel("env in (prod,dev)").matches(&l));
        assert!(!sel("env in (dev)").matches(&l));
        assert!(sel("env notin (dev, qa)").matches(&l));
        assert!(sel("other notin (dev)").matches(&l));
        assert!(!sel("other in (dev)").matches(&l));
        assert!(sel("n>4").matches(&l));
        assert!(!sel("n<4").matches(&l));
        assert!(sel("env in (prod),n").matches(&l));
    }

    #[test]
    fn parse_errors() {
        for bad in [
            "=a", "a==", "a in", "a in ()", "a in (b", "a,", "!a=b", "a b", "-a=b", "a=b c", "a/=x",
        ] {
            // "a==" is valid (empty value) in Kubernetes; skip it in this loop.
            if bad == "a==" {
                assert!(LabelSelector::parse(bad).is_ok());
                continue;
            }
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let f = FieldSelector::parse("metadata.name=web,metadata.namespace!=kube-system").unwrap();
        assert!(f.matches("default", "web"));
        assert!(!f.matches("kube-system", "web"));
        assert!(!f.matches("default", "db"));
        assert!(FieldSelector::parse("").unwrap().is_empty());
        assert!(FieldSelector::parse("spec.clusterIP=None").is_err());
        assert!(
            FieldSelector::parse("metadata.name==a")
                .unwrap()
                .matches("x", "a")
        );
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
