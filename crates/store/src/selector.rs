//! Label selectors in the Kubernetes syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x,y)`, `a`, `!a`,
//! joined by commas (AND). Parsed once per list, then matched against each object's labels.

use std::collections::BTreeMap;

use crate::StoreError;

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Not,
    Eq,
    NotEq,
    Open,
    Close,
    Comma,
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(model::Invalid::one("labelSelector", message))
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn tokenize(input: &str) -> Result<Vec<Token>, StoreError> {
    let mut tokens = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            ',' => tokens.push(Token::Comma),
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            '=' => {
                if chars.peek().map(|(_, c)| *c) == Some('=') {
                    chars.next();
                }
                tokens.push(Token::Eq);
            }
            '!' => {
                if chars.peek().map(|(_, c)| *c) == Some('=') {
                    chars.next();
                    tokens.push(Token::NotEq);
                } else {
                    tokens.push(Token::Not);
                }
            }
            c if is_word_char(c) => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if !is_word_char(d) {
                        break;
                    }
                    end = j + d.len_utf8();
                    chars.next();
                }
                tokens.push(Token::Word(input[i..end].to_string()));
            }
            other => {
                return Err(invalid(format!(
                    "unexpected character {other:?} at offset {i} in {input:?}"
                )))
            }
        }
    }
    Ok(tokens)
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() || name.len() > 63 || name.contains('/') {
        return Err(invalid(format!("invalid label key {key:?}")));
    }
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || p.contains('/') {
            return Err(invalid(format!("invalid label key prefix in {key:?}")));
        }
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), StoreError> {
    if value.len() > 63 || value.contains('/') {
        return Err(invalid(format!("invalid label value {value:?}")));
    }
    Ok(())
}

impl Selector {
    /// Parses a selector; an error is [`StoreError::Invalid`] naming the field `labelSelector`.
    pub fn parse(input: &str) -> Result<Selector, StoreError> {
        let tokens = tokenize(input)?;
        let mut requirements = Vec::new();
        let mut pos = 0;
        if tokens.is_empty() {
            return Ok(Selector { requirements });
        }
        loop {
            let (req, next) = Self::requirement(&tokens, pos, input)?;
            requirements.push(req);
            pos = next;
            match tokens.get(pos) {
                None => break,
                Some(Token::Comma) => pos += 1,
                Some(t) => {
                    return Err(invalid(format!(
                        "expected ',' but found {} in {input:?}",
                        describe(t)
                    )))
                }
            }
        }
        Ok(Selector { requirements })
    }

    fn requirement(
        tokens: &[Token],
        pos: usize,
        input: &str,
    ) -> Result<(Requirement, usize), StoreError> {
        let word = |p: usize| match tokens.get(p) {
            Some(Token::Word(w)) => Some(w.clone()),
            _ => None,
        };
        if tokens.get(pos) == Some(&Token::Not) {
            let key = word(pos + 1)
                .ok_or_else(|| invalid(format!("expected a label key after '!' in {input:?}")))?;
            check_key(&key)?;
            return Ok((Requirement::NotExists(key), pos + 2));
        }
        let key = word(pos).ok_or_else(|| invalid(format!("expected a label key in {input:?}")))?;
        check_key(&key)?;
        match tokens.get(pos + 1) {
            None | Some(Token::Comma) => Ok((Requirement::Exists(key), pos + 1)),
            Some(op @ (Token::Eq | Token::NotEq)) => {
                // An empty value (`a=`) is allowed and matches the empty label value.
                let (value, next) = match tokens.get(pos + 2) {
                    Some(Token::Word(w)) => (w.clone(), pos + 3),
                    None | Some(Token::Comma) => (String::new(), pos + 2),
                    Some(t) => {
                        return Err(invalid(format!(
                            "expected a value but found {} in {input:?}",
                            describe(t)
                        )))
                    }
                };
                check_value(&value)?;
                let req = if *op == Token::Eq {
                    Requirement::Equals(key, value)
                } else {
                    Requirement::NotEquals(key, value)
                };
                Ok((req, next))
            }
            Some(Token::Word(w)) if w == "in" || w == "notin" => {
                let notin = w == "notin";
                if tokens.get(pos + 2) != Some(&Token::Open) {
                    return Err(invalid(format!("expected '(' after {w} in {input:?}")));
                }
                let mut values = Vec::new();
                let mut p = pos + 3;
                loop {
                    match tokens.get(p) {
                        Some(Token::Word(v)) => {
                            check_value(v)?;
                            values.push(v.clone());
                            p += 1;
                        }
                        Some(t) => {
                            return Err(invalid(format!(
                                "expected a value but found {} in {input:?}",
                                describe(t)
                            )))
                        }
                        None => return Err(invalid(format!("unclosed '(' in {input:?}"))),
                    }
                    match tokens.get(p) {
                        Some(Token::Comma) => p += 1,
                        Some(Token::Close) => {
                            p += 1;
                            break;
                        }
                        Some(t) => {
                            return Err(invalid(format!(
                                "expected ',' or ')' but found {} in {input:?}",
                                describe(t)
                            )))
                        }
                        None => return Err(invalid(format!("unclosed '(' in {input:?}"))),
                    }
                }
                let req = if notin {
                    Requirement::NotIn(key, values)
                } else {
                    Requirement::In(key, values)
                };
                Ok((req, p))
            }
            Some(t) => Err(invalid(format!(
                "unexpected {} after label key {key:?} in {input:?}",
                describe(t)
            ))),
        }
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// True for the selector that matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::Word(w) => format!("{w:?}"),
        Token::Not => "'!'".into(),
        Token::Eq => "'='".into(),
        Token::NotEq => "'!='".into(),
        Token::Open => "'('".into(),
        Token::Close => "')'".into(),
        Token::Comma => "','".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::Selector;
    use crate::StoreError;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matches(sel: &str, pairs: &[(&str, &str)]) -> bool {
        match Selector::parse(sel) {
            Ok(s) => s.matches(&labels(pairs)),
            Err(e) => panic!("{sel:?} should parse: {e}"),
        }
    }

    #[test]
    fn operators() {
        let l = [("app", "web"), ("tier", "front"), ("kiln.dev/team", "a")];
        assert!(matches("", &l));
        assert!(matches("app=web", &l));
        assert!(matches("app==web", &l));
        assert!(!matches("app=api", &l));
        assert!(matches("app!=api", &l));
        assert!(matches("missing!=x", &l));
        assert!(!matches("app!=web", &l));
        assert!(matches("app in (api, web)", &l));
        assert!(!matches("app in (api)", &l));
        assert!(!matches("missing in (x)", &l));
        assert!(matches("app notin (api)", &l));
        assert!(matches("missing notin (x)", &l));
        assert!(!matches("app notin (web,api)", &l));
        assert!(matches("app", &l));
        assert!(!matches("missing", &l));
        assert!(matches("!missing", &l));
        assert!(!matches("!app", &l));
        assert!(matches("kiln.dev/team=a", &l));
        assert!(matches(" app = web , tier in (front) , !x ", &l));
        assert!(!matches("app=web,tier=back", &l));
        assert!(matches("e=", &[("e", "")]));
        assert!(!matches("e=", &[("e", "x")]));
    }

    #[test]
    fn errors_name_the_field() {
        for bad in [
            "app=web,",
            ",",
            "a in x",
            "a in (x",
            "a in ()",
            "a b",
            "!",
            "a=(b)",
            "a=b=c",
            "a=é",
            "=b",
            "a in (x,)",
        ] {
            match Selector::parse(bad) {
                Err(StoreError::Invalid(inv)) => {
                    assert_eq!(inv.errors[0].path, "labelSelector", "{bad:?}: {inv}");
                }
                other => panic!("{bad:?} should be rejected, got {other:?}"),
            }
        }
    }
}
