//! Users, tokens, sessions, the audit log and per-object events on SQLite. Writes go through the writer
//! thread (so they share its group commit), reads through the read pool.

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, Row};

use super::{params, Sqlite};
use crate::identity::{from_micros, now, to_micros};
use crate::{
    sql, AuditQuery, AuditRecord, Event, LogLine, NewUser, Result, Session, StoreError, Token,
    User, EVENTS_PER_OBJECT,
};

const USER_COLS: &str = "id, name, password_hash, superuser, created_at";
const TOKEN_COLS: &str =
    "id, user_id, name, hash, created_at, expires_at, revoked_at, last_used_at";
const SESSION_COLS: &str = "id, user_id, hash, created_at, expires_at";

fn user(r: &Row<'_>) -> rusqlite::Result<(String, String, Option<String>, bool, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_user(t: (String, String, Option<String>, bool, i64)) -> Result<User> {
    Ok(User {
        id: t.0,
        name: t.1,
        password_hash: t.2,
        superuser: t.3,
        created_at: from_micros(t.4)?,
    })
}

type TokenRow = (
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn token(r: &Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn opt_time(v: Option<i64>) -> Result<Option<Timestamp>> {
    v.map(from_micros).transpose()
}

fn to_token(t: TokenRow) -> Result<Token> {
    Ok(Token {
        id: t.0,
        user_id: t.1,
        name: t.2,
        hash: t.3,
        created_at: from_micros(t.4)?,
        expires_at: opt_time(t.5)?,
        revoked_at: opt_time(t.6)?,
        last_used_at: opt_time(t.7)?,
    })
}

fn user_exists(conn: &Connection, id: &str) -> Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM kiln_users WHERE id = ?1", [id], |_| Ok(()))
        .optional()?
        .is_some())
}

fn user_where(conn: &Connection, cond: &str, arg: &str) -> Result<Option<User>> {
    let row = conn
        .query_row(
            &format!("SELECT {USER_COLS} FROM kiln_users WHERE {cond} = ?1"),
            [arg],
            user,
        )
        .optional()?;
    row.map(to_user).transpose()
}

impl Sqlite {
    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        self.write(move |ctx| {
            if user_where(ctx.conn, "name", &new.name)?.is_some() {
                return Err(StoreError::Duplicate(format!(
                    "a user named {:?} already exists",
                    new.name
                )));
            }
            let u = User {
                id: uuid::Uuid::new_v4().to_string(),
                name: new.name,
                password_hash: new.password_hash,
                superuser: new.superuser,
                created_at: now(),
            };
            ctx.conn.execute(
                &format!("INSERT INTO kiln_users ({USER_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                rusqlite::params![
                    u.id,
                    u.name,
                    u.password_hash,
                    u.superuser,
                    to_micros(u.created_at)
                ],
            )?;
            Ok(u)
        })
        .await
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        let name = name.to_string();
        self.read(move |conn| user_where(conn, "name", &name)).await
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let id = id.to_string();
        self.read(move |conn| user_where(conn, "id", &id)).await
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {USER_COLS} FROM kiln_users ORDER BY name"))?;
            let rows = stmt
                .query_map([], user)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(to_user).collect()
        })
        .await
    }

    pub async fn set_password(&self, user_id: &str, hash: Option<&str>) -> Result<()> {
        let (id, hash) = (user_id.to_string(), hash.map(str::to_string));
        self.write(move |ctx| {
            let n = ctx.conn.execute(
                "UPDATE kiln_users SET password_hash = ?2 WHERE id = ?1",
                rusqlite::params![id, hash],
            )?;
            if n == 0 {
                return Err(StoreError::Missing(format!("no user with id {id:?}")));
            }
            Ok(())
        })
        .await
    }

    pub async fn delete_user(&self, user_id: &str) -> Result<()> {
        let id = user_id.to_string();
        self.write(move |ctx| {
            // Foreign keys cascade to tokens and sessions.
            let n = ctx
                .conn
                .execute("DELETE FROM kiln_users WHERE id = ?1", [&id])?;
            if n == 0 {
                return Err(StoreError::Missing(format!("no user with id {id:?}")));
            }
            Ok(())
        })
        .await
    }

    pub async fn count_users(&self) -> Result<u64> {
        self.read(|conn| super::scalar(conn, "SELECT count(*) FROM kiln_users"))
            .await
    }

    pub async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        hash: &str,
        expires_at: Option<Timestamp>,
    ) -> Result<Token> {
        let t = Token {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: user_id.to_string(),
            name: name.to_string(),
            hash: hash.to_string(),
            created_at: now(),
            expires_at: expires_at.map(to_micros).map(from_micros).transpose()?,
            revoked_at: None,
            last_used_at: None,
        };
        self.write(move |ctx| {
            if !user_exists(ctx.conn, &t.user_id)? {
                return Err(StoreError::Missing(format!("no user with id {:?}", t.user_id)));
            }
            let dup = ctx.conn.query_row("SELECT 1 FROM kiln_tokens WHERE hash = ?1", [&t.hash], |_| Ok(())).optional()?;
            if dup.is_some() {
                return Err(StoreError::Duplicate("a token with this secret already exists".into()));
            }
            ctx.conn.execute(
                &format!("INSERT INTO kiln_tokens ({TOKEN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL)"),
                rusqlite::params![t.id, t.user_id, t.name, t.hash, to_micros(t.created_at), t.expires_at.map(to_micros)],
            )?;
            Ok(t)
        })
        .await
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        let hash = hash.to_string();
        self.read(move |conn| {
            let row = conn
                .query_row(
                    &format!("SELECT {TOKEN_COLS} FROM kiln_tokens WHERE hash = ?1"),
                    [&hash],
                    token,
                )
                .optional()?;
            row.map(to_token).transpose()
        })
        .await
    }

    pub async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<Token>> {
        let user_id = user_id.map(str::to_string);
        self.read(move |conn| {
            let rows = match &user_id {
                Some(u) => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {TOKEN_COLS} FROM kiln_tokens WHERE user_id = ?1 ORDER BY created_at, id"
                    ))?;
                    let rows = stmt.query_map([u], token)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    rows
                }
                None => {
                    let mut stmt =
                        conn.prepare_cached(&format!("SELECT {TOKEN_COLS} FROM kiln_tokens ORDER BY created_at, id"))?;
                    let rows = stmt.query_map([], token)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    rows
                }
            };
            rows.into_iter().map(to_token).collect()
        })
        .await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        let at = to_micros(now());
        self.write(move |ctx| {
            let exists = ctx
                .conn
                .query_row("SELECT 1 FROM kiln_tokens WHERE id = ?1", [&id], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::Missing(format!("no token with id {id:?}")));
            }
            ctx.conn.execute(
                "UPDATE kiln_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                rusqlite::params![id, at],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn touch_token(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        let at = to_micros(now());
        self.write(move |ctx| {
            ctx.conn.execute(
                "UPDATE kiln_tokens SET last_used_at = ?2 WHERE id = ?1",
                rusqlite::params![id, at],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn create_session(
        &self,
        user_id: &str,
        hash: &str,
        expires_at: Timestamp,
    ) -> Result<Session> {
        let s = Session {
            id: uuid::Uuid::new_v4().to_string(),
            user_id: user_id.to_string(),
            hash: hash.to_string(),
            created_at: now(),
            expires_at: from_micros(to_micros(expires_at))?,
        };
        self.write(move |ctx| {
            if !user_exists(ctx.conn, &s.user_id)? {
                return Err(StoreError::Missing(format!(
                    "no user with id {:?}",
                    s.user_id
                )));
            }
            let dup = ctx
                .conn
                .query_row(
                    "SELECT 1 FROM kiln_sessions WHERE hash = ?1",
                    [&s.hash],
                    |_| Ok(()),
                )
                .optional()?;
            if dup.is_some() {
                return Err(StoreError::Duplicate(
                    "a session with this cookie already exists".into(),
                ));
            }
            ctx.conn.execute(
                &format!("INSERT INTO kiln_sessions ({SESSION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
                rusqlite::params![
                    s.id,
                    s.user_id,
                    s.hash,
                    to_micros(s.created_at),
                    to_micros(s.expires_at)
                ],
            )?;
            Ok(s)
        })
        .await
    }

    pub async fn session_by_hash(&self, hash: &str) -> Result<Option<Session>> {
        let hash = hash.to_string();
        self.read(move |conn| {
            let row = conn
                .query_row(
                    &format!("SELECT {SESSION_COLS} FROM kiln_sessions WHERE hash = ?1"),
                    [&hash],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
                .optional()?;
            row.map(|(id, user_id, hash, c, e)| {
                Ok(Session {
                    id,
                    user_id,
                    hash,
                    created_at: from_micros(c)?,
                    expires_at: from_micros(e)?,
                })
            })
            .transpose()
        })
        .await
    }

    pub async fn delete_session(&self, hash: &str) -> Result<()> {
        let hash = hash.to_string();
        self.write(move |ctx| {
            ctx.conn
                .execute("DELETE FROM kiln_sessions WHERE hash = ?1", [&hash])?;
            Ok(())
        })
        .await
    }

    pub async fn append_audit(&self, rec: AuditRecord) -> Result<u64> {
        self.write(move |ctx| {
            ctx.conn.execute(
                "INSERT INTO kiln_audit (time, user_name, action, kind, organization, project, name, status, outcome) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                rusqlite::params![
                    to_micros(rec.time),
                    rec.user,
                    rec.action,
                    rec.kind,
                    rec.organization,
                    rec.project,
                    rec.name,
                    rec.status,
                    rec.outcome
                ],
            )?;
            Ok(u64::try_from(ctx.conn.last_insert_rowid()).unwrap_or(0))
        })
        .await
    }

    pub async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let s = sql::audit('?', q);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(&s.sql)?;
            let rows = stmt
                .query_map(params(&s.params), |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<String>>(7)?,
                        r.get::<_, u16>(8)?,
                        r.get::<_, String>(9)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(
                    |(
                        id,
                        time,
                        user,
                        action,
                        kind,
                        organization,
                        project,
                        name,
                        status,
                        outcome,
                    )| {
                        Ok(AuditRecord {
                            id: u64::try_from(id).unwrap_or(0),
                            time: from_micros(time)?,
                            user,
                            action,
                            kind,
                            organization,
                            project,
                            name,
                            status,
                            outcome,
                        })
                    },
                )
                .collect()
        })
        .await
    }

    pub async fn record_event(&self, ev: Event) -> Result<()> {
        self.write(move |ctx| {
            let org = ev.organization.as_deref().unwrap_or("");
            let project = ev.project.as_deref().unwrap_or("");
            ctx.conn.execute(
                "INSERT INTO kiln_object_events (time, kind, organization, project, name, type, reason, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                rusqlite::params![to_micros(ev.time), ev.kind, org, project, ev.name, ev.type_, ev.reason, ev.message],
            )?;
            ctx.conn.execute(
                "DELETE FROM kiln_object_events WHERE kind = ?1 AND organization = ?2 AND project = ?3 AND name = ?4 \
                 AND id <= (SELECT id FROM kiln_object_events WHERE kind = ?1 AND organization = ?2 AND project = ?3 \
                 AND name = ?4 ORDER BY id DESC LIMIT 1 OFFSET ?5)",
                rusqlite::params![ev.kind, org, project, ev.name, EVENTS_PER_OBJECT as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn list_events(
        &self,
        kind: &str,
        organization: Option<&str>,
        project: Option<&str>,
        name: &str,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let (kind, org, project, name) = (
            kind.to_string(),
            organization.unwrap_or("").to_string(),
            project.unwrap_or("").to_string(),
            name.to_string(),
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT time, type, reason, message FROM kiln_object_events \
                 WHERE kind = ?1 AND organization = ?2 AND project = ?3 AND name = ?4 ORDER BY id DESC LIMIT ?5",
            )?;
            let rows = stmt
                .query_map(rusqlite::params![kind, org, project, name, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(time, type_, reason, message)| {
                    Ok(Event {
                        time: from_micros(time)?,
                        kind: kind.clone(),
                        organization: (!org.is_empty()).then(|| org.clone()),
                        project: (!project.is_empty()).then(|| project.clone()),
                        name: name.clone(),
                        type_,
                        reason,
                        message,
                    })
                })
                .collect()
        })
        .await
    }
}

impl Sqlite {
    pub async fn append_logs(&self, stream: &str, lines: Vec<LogLine>) -> Result<u64> {
        let stream = stream.to_string();
        self.write(move |ctx| {
            let last: i64 = ctx.conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM kiln_logs WHERE stream = ?1",
                [&stream],
                |r| r.get(0),
            )?;
            let mut seq = last;
            let mut stmt = ctx.conn.prepare_cached(
                "INSERT INTO kiln_logs (stream, seq, time, source, text) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for l in &lines {
                seq += 1;
                stmt.execute(rusqlite::params![stream, seq, to_micros(l.time), l.source, l.text])?;
            }
            Ok(seq as u64)
        })
        .await
    }

    pub async fn read_logs(&self, stream: &str, after: u64, limit: usize) -> Result<Vec<LogLine>> {
        let stream = stream.to_string();
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, time, source, text FROM kiln_logs WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(rusqlite::params![stream, after, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter()
                .map(|(seq, time, source, text)| {
                    Ok(LogLine { seq: seq as u64, time: from_micros(time)?, source, text })
                })
                .collect()
        })
        .await
    }

    pub async fn last_log_seq(&self, stream: &str) -> Result<u64> {
        let stream = stream.to_string();
        self.read(move |conn| {
            let last: i64 = conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM kiln_logs WHERE stream = ?1",
                [&stream],
                |r| r.get(0),
            )?;
            Ok(last as u64)
        })
        .await
    }

    pub async fn delete_logs(&self, stream: &str) -> Result<()> {
        let stream = stream.to_string();
        self.write(move |ctx| {
            ctx.conn
                .execute("DELETE FROM kiln_logs WHERE stream = ?1", [&stream])?;
            Ok(())
        })
        .await
    }
}

impl Sqlite {
    pub async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let name = name.to_string();
        self.write(move |ctx| {
            ctx.conn.execute(
                "INSERT INTO kiln_blobs (name, data, updated) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated = excluded.updated",
                rusqlite::params![name, data, to_micros(now())],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn create_blob(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        let name = name.to_string();
        self.write(move |ctx| {
            let n = ctx.conn.execute(
                "INSERT INTO kiln_blobs (name, data, updated) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO NOTHING",
                rusqlite::params![name, data, to_micros(now())],
            )?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let name = name.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached("SELECT data FROM kiln_blobs WHERE name = ?1")?;
            let mut rows = stmt.query([&name])?;
            match rows.next()? {
                Some(r) => Ok(Some(r.get::<_, Vec<u8>>(0)?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn blob_names(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.to_string();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name FROM kiln_blobs WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
            )?;
            let names = stmt
                .query_map([&prefix], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(names)
        })
        .await
    }

    pub async fn delete_blob(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |ctx| {
            let n = ctx
                .conn
                .execute("DELETE FROM kiln_blobs WHERE name = ?1", [&name])?;
            Ok(n > 0)
        })
        .await
    }
}
