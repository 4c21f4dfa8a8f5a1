//! SQL text shared by both backends: statements whose shape depends on optional filters, built with numbered
//! placeholders (`?1` for SQLite, `$1` for PostgreSQL) and a parameter list each backend binds its own way.

use crate::cursor::Cursor;
use crate::watch::Filter;
use crate::{AuditQuery, ListQuery};

/// One bound parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// A statement being built: SQL text plus its parameters in placeholder order.
#[derive(Debug)]
pub(crate) struct Query {
    prefix: char,
    pub sql: String,
    pub params: Vec<Param>,
}

impl Query {
    pub fn new(prefix: char, sql: &str) -> Query {
        Query {
            prefix,
            sql: sql.to_string(),
            params: Vec::new(),
        }
    }

    /// Adds a parameter and returns its placeholder.
    pub fn bind(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("{}{}", self.prefix, self.params.len())
    }

    pub fn text(&mut self, s: &str) -> String {
        self.bind(Param::Text(s.to_string()))
    }
}

/// Saturating conversion for limits and revisions bound as SQL integers.
pub(crate) fn int(n: impl TryInto<i64>) -> Param {
    Param::Int(n.try_into().unwrap_or(i64::MAX))
}

/// One keyset scan step over `kiln_resources`: the bodies of up to `limit` objects after `after`, in list order.
pub(crate) fn scan(prefix: char, q: &ListQuery, after: Option<&Cursor>, limit: usize) -> Query {
    let mut s = Query::new(prefix, "");
    let mut conds: Vec<String> = Vec::new();
    if let Some(k) = q.kind {
        conds.push(format!("kind = {}", s.text(k.as_str())));
    }
    if let Some(o) = &q.organization {
        conds.push(format!("organization = {}", s.text(o)));
    }
    if let Some(p) = &q.project {
        conds.push(format!("project = {}", s.text(p)));
    }
    let order = if q.kind.is_some() {
        "organization, project, name"
    } else {
        "organization, project, name, kind"
    };
    if let Some(c) = after {
        let mut phs = vec![s.text(&c.organization), s.text(&c.project), s.text(&c.name)];
        if q.kind.is_none() {
            phs.push(s.text(&c.kind));
        }
        conds.push(format!("({order}) > ({})", phs.join(", ")));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let lim = s.bind(int(limit));
    s.sql = format!("SELECT body FROM kiln_resources{filter} ORDER BY {order} LIMIT {lim}");
    s
}

/// Up to `limit` events of the log in `(after, upto]` matching `f`, in revision order.
pub(crate) fn events(prefix: char, f: &Filter, after: u64, upto: u64, limit: usize) -> Query {
    let mut s = Query::new(prefix, "");
    let mut sql = format!(
        "SELECT rev, type, body FROM kiln_events WHERE rev > {} AND rev <= {}",
        s.bind(int(after)),
        s.bind(int(upto))
    );
    if let Some(k) = f.kind {
        sql.push_str(&format!(" AND kind = {}", s.text(k.as_str())));
    }
    if let Some(o) = &f.organization {
        sql.push_str(&format!(" AND organization = {}", s.text(o)));
    }
    if let Some(p) = &f.project {
        sql.push_str(&format!(" AND project = {}", s.text(p)));
    }
    sql.push_str(&format!(" ORDER BY rev LIMIT {}", s.bind(int(limit))));
    s.sql = sql;
    s
}

/// The audit records matching `q`, newest first.
pub(crate) fn audit(prefix: char, q: &AuditQuery) -> Query {
    let mut s = Query::new(prefix, "");
    let mut conds: Vec<String> = Vec::new();
    if let Some(u) = &q.user {
        conds.push(format!("user_name = {}", s.text(u)));
    }
    if let Some(k) = &q.kind {
        conds.push(format!("kind = {}", s.text(k)));
    }
    if let Some(o) = &q.organization {
        conds.push(format!("organization = {}", s.text(o)));
    }
    if let Some(t) = q.since {
        conds.push(format!(
            "time >= {}",
            s.bind(Param::Int(t.as_microsecond()))
        ));
    }
    if let Some(t) = q.until {
        conds.push(format!(
            "time <= {}",
            s.bind(Param::Int(t.as_microsecond()))
        ));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let lim = s.bind(int(q.limit.unwrap_or(100)));
    s.sql = format!(
        "SELECT id, time, user_name, action, kind, organization, project, name, status, outcome \
         FROM kiln_audit{filter} ORDER BY time DESC, id DESC LIMIT {lim}"
    );
    s
}

#[cfg(test)]
mod tests {
    use model::Kind;

    use super::*;

    #[test]
    fn scan_shapes() {
        let q = ListQuery {
            kind: Some(Kind::Component),
            organization: Some("o".into()),
            ..Default::default()
        };
        let c = Cursor {
            organization: "o".into(),
            project: "p".into(),
            name: "n".into(),
            kind: "Component".into(),
        };
        let s = scan('$', &q, Some(&c), 10);
        assert_eq!(
            s.sql,
            "SELECT body FROM kiln_resources WHERE kind = $1 AND organization = $2 \
             AND (organization, project, name) > ($3, $4, $5) ORDER BY organization, project, name LIMIT $6"
        );
        assert_eq!(s.params.len(), 6);
        assert_eq!(s.params[5], Param::Int(10));
        let s = scan('?', &ListQuery::default(), Some(&c), 1);
        assert!(
            s.sql
                .contains("(organization, project, name, kind) > (?1, ?2, ?3, ?4)"),
            "{}",
            s.sql
        );
        assert!(s.sql.ends_with("LIMIT ?5"), "{}", s.sql);
        let s = scan('?', &ListQuery::default(), None, 1);
        assert_eq!(
            s.sql,
            "SELECT body FROM kiln_resources ORDER BY organization, project, name, kind LIMIT ?1"
        );
    }

    #[test]
    fn events_shape() {
        let f = Filter {
            kind: None,
            organization: Some("o".into()),
            project: None,
        };
        let s = events('?', &f, 3, 9, 100);
        assert_eq!(s.sql, "SELECT rev, type, body FROM kiln_events WHERE rev > ?1 AND rev <= ?2 AND organization = ?3 ORDER BY rev LIMIT ?4");
        assert_eq!(
            s.params,
            vec![
                Param::Int(3),
                Param::Int(9),
                Param::Text("o".into()),
                Param::Int(100)
            ]
        );
    }
}
