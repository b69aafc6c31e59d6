//! Label and field selectors, parsed the way the API server parses them (the subset clients
//! send: `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)`,
//! `key notin (a,b)`, comma-joined).

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: every requirement must hold. Empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

/// Splits on commas that are not inside parentheses (`a in (x,y),b` is two terms).
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' in {s:?}"))?
            }
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {s:?}"));
    }
    terms.push(&s[start..]);
    Ok(terms)
}

fn check_key(key: &str, whole: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_string())
    } else {
        Err(format!("invalid label key {key:?} in {whole:?}"))
    }
}

fn check_value(value: &str, whole: &str) -> Result<String, String> {
    let valid = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!("invalid label value {value:?} in {whole:?}"))
    }
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values) in {whole:?}"))?;
    inner
        .split(',')
        .map(|v| check_value(v.trim(), whole))
        .collect()
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in split_terms(s)? {
            let term = term.trim();
            if term.is_empty() {
                return Err(format!("empty requirement in {s:?}"));
            }
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement::DoesNotExist(check_key(key.trim(), s)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(check_key(k.trim(), s)?, check_value(v.trim(), s)?)
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(check_key(k.trim(), s)?, check_value(v.trim(), s)?)
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(check_key(k.trim(), s)?, check_value(v.trim(), s)?)
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                Requirement::NotIn(check_key(k.trim(), s)?, parse_set(rest, s)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                Requirement::In(check_key(k.trim(), s)?, parse_set(rest, s)?)
            } else {
                Requirement::Exists(check_key(term, s)?)
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether an object (its `metadata.labels`) satisfies every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        })
    }
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, comma-joined, where a
/// path is a dotted JSON path such as `metadata.name`. A missing field reads as "".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in s.split(',') {
            let term = term.trim();
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector term {term:?} in {s:?}"));
            };
            let path = path.trim();
            if path.is_empty() {
                return Err(format!("empty field path in {s:?}"));
            }
            reqs.push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, value)| {
            let pointer: String = path.split('.').map(|p| format!("/{p}")).collect();
            let actual = match obj.pointer(&pointer) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn parses_kube_proxy_selector() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert_eq!(
            s.0,
            vec![
                Requirement::DoesNotExist("service.kubernetes.io/service-proxy-name".into()),
                Requirement::DoesNotExist("service.kubernetes.io/headless".into()),
            ]
        );
        assert!(s.matches(&obj(json!({"app": "x"}))));
        assert!(s.matches(&json!({"metadata": {"name": "no-labels"}})));
        assert!(!s.matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        assert!(!s.matches(&obj(
            json!({"service.kubernetes.io/service-proxy-name": "other"})
        )));
    }

    #[test]
    fn parses_all_forms() {
        let s = LabelSelector::parse("a, !b, c=1, d==2, e!=3, f in (x, y), g notin (z)").unwrap();
        assert_eq!(
            s.0,
            vec![
                Requirement::Exists("a".into()),
                Requirement::DoesNotExist("b".into()),
                Requirement::Equals("c".into(), "1".into()),
                Requirement::Equals("d".into(), "2".into()),
                Requirement::NotEquals("e".into(), "3".into()),
                Requirement::In("f".into(), vec!["x".into(), "y".into()]),
                Requirement::NotIn("g".into(), vec!["z".into()]),
            ]
        );
        let ok = obj(json!({"a": "", "c": "1", "d": "2", "f": "y"}));
        assert!(s.matches(&ok));
        let mut bad = ok.clone();
        bad["metadata"]["labels"]["e"] = json!("3");
        assert!(!s.matches(&bad));
        let mut bad = ok.clone();
        bad["metadata"]["labels"]["g"] = json!("z");
        assert!(!s.matches(&bad));
        let mut bad = ok.clone();
        bad["metadata"]["labels"]["f"] = json!("q");
        assert!(!s.matches(&bad));
        let mut bad = ok;
        bad["metadata"]["labels"]["b"] = json!("");
        assert!(!s.matches(&bad));
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = LabelSelector::parse("").unwrap();
        assert!(s.0.is_empty());
        assert!(s.matches(&json!({})));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["a,,b", "!", "a=(", "a in x", "a in (x", "a)=b", "a=b c"] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn field_selector() {
        let s = FieldSelector::parse("metadata.name=node-1").unwrap();
        assert!(s.matches(&json!({"metadata": {"name": "node-1"}})));
        assert!(!s.matches(&json!({"metadata": {"name": "node-2"}})));
        let s =
            FieldSelector::parse("metadata.namespace!=kube-system,spec.type==ClusterIP").unwrap();
        assert!(s.matches(&json!({"metadata": {"namespace": "a"}, "spec": {"type": "ClusterIP"}})));
        assert!(!s.matches(
            &json!({"metadata": {"namespace": "kube-system"}, "spec": {"type": "ClusterIP"}})
        ));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
