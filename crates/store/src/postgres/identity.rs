//! Users, tokens, sessions, the audit log and per-object events on PostgreSQL.

use jiff::Timestamp;
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::pool::pg_err;
use super::{col, pg_params, Postgres};
use crate::identity::{from_micros, now, to_micros};
use crate::{
    sql, AuditQuery, AuditRecord, Event, LogLine, NewUser, Result, Session, StoreError, Token,
    User, EVENTS_PER_OBJECT,
};

const USER_COLS: &str = "id, name, password_hash, superuser, created_at";
const TOKEN_COLS: &str =
    "id, user_id, name, hash, created_at, expires_at, revoked_at, last_used_at";
const SESSION_COLS: &str = "id, user_id, hash, created_at, expires_at";

fn to_user(r: &Row) -> Result<User> {
    Ok(User {
        id: col(r, 0)?,
        name: col(r, 1)?,
        password_hash: col(r, 2)?,
        superuser: col(r, 3)?,
        created_at: from_micros(col(r, 4)?)?,
    })
}

fn opt_time(r: &Row, i: usize) -> Result<Option<Timestamp>> {
    col::<Option<i64>>(r, i)?.map(from_micros).transpose()
}

fn to_token(r: &Row) -> Result<Token> {
    Ok(Token {
        id: col(r, 0)?,
        user_id: col(r, 1)?,
        name: col(r, 2)?,
        hash: col(r, 3)?,
        created_at: from_micros(col(r, 4)?)?,
        expires_at: opt_time(r, 5)?,
        revoked_at: opt_time(r, 6)?,
        last_used_at: opt_time(r, 7)?,
    })
}

fn to_session(r: &Row) -> Result<Session> {
    Ok(Session {
        id: col(r, 0)?,
        user_id: col(r, 1)?,
        hash: col(r, 2)?,
        created_at: from_micros(col(r, 3)?)?,
        expires_at: from_micros(col(r, 4)?)?,
    })
}

/// Maps unique and foreign-key violations to the identity errors callers handle.
fn constraint(e: tokio_postgres::Error, duplicate: &str, missing: &str) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Duplicate(duplicate.to_string()),
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            StoreError::Missing(missing.to_string())
        }
        _ => pg_err(e),
    }
}

impl Postgres {
    async fn user_where(&self, cond: &str, arg: &str) -> Result<Option<User>> {
        let mut c = self.pool.get().await?;
        let row = c
            .query_opt_cached(
                &format!("SELECT {USER_COLS} FROM kiln_users WHERE {cond} = $1"),
                &[&arg],
            )
            .await?;
        row.as_ref().map(to_user).transpose()
    }

    pub async fn create_user(&self, new: NewUser) -> Result<User> {
        let u = User {
            id: uuid::Uuid::new_v4().to_string(),
            name: new.name,
            password_hash: new.password_hash,
            superuser: new.superuser,
            created_at: now(),
        };
        let c = self.pool.get().await?;
        c.execute(
            &format!("INSERT INTO kiln_users ({USER_COLS}) VALUES ($1, $2, $3, $4, $5)"),
            &[
                &u.id,
                &u.name,
                &u.password_hash,
                &u.superuser,
                &to_micros(u.created_at),
            ],
        )
        .await
        .map_err(|e| constraint(e, &format!("a user named {:?} already exists", u.name), ""))?;
        Ok(u)
    }

    pub async fn user_by_name(&self, name: &str) -> Result<Option<User>> {
        self.user_where("name", name).await
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        self.user_where("id", id).await
    }

    pub async fn list_users(&self) -> Result<Vec<User>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                &format!("SELECT {USER_COLS} FROM kiln_users ORDER BY name COLLATE \"C\""),
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(to_user).collect()
    }

    pub async fn set_password(&self, user_id: &str, hash: Option<&str>) -> Result<()> {
        let c = self.pool.get().await?;
        let n = c
            .execute(
                "UPDATE kiln_users SET password_hash = $2 WHERE id = $1",
                &[&user_id, &hash],
            )
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Err(StoreError::Missing(format!("no user with id {user_id:?}")));
        }
        Ok(())
    }

    pub async fn delete_user(&self, user_id: &str) -> Result<()> {
        let c = self.pool.get().await?;
        let n = c
            .execute("DELETE FROM kiln_users WHERE id = $1", &[&user_id])
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Err(StoreError::Missing(format!("no user with id {user_id:?}")));
        }
        Ok(())
    }

    pub async fn count_users(&self) -> Result<u64> {
        let c = self.pool.get().await?;
        super::scalar(&*c, "SELECT count(*) FROM kiln_users").await
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
        let c = self.pool.get().await?;
        c.execute(
            &format!("INSERT INTO kiln_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)"),
            &[&t.id, &t.user_id, &t.name, &t.hash, &to_micros(t.created_at), &t.expires_at.map(to_micros)],
        )
        .await
        .map_err(|e| {
            constraint(e, "a token with this secret already exists", &format!("no user with id {user_id:?}"))
        })?;
        Ok(t)
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        let mut c = self.pool.get().await?;
        let row = c
            .query_opt_cached(
                &format!("SELECT {TOKEN_COLS} FROM kiln_tokens WHERE hash = $1"),
                &[&hash],
            )
            .await?;
        row.as_ref().map(to_token).transpose()
    }

    pub async fn list_tokens(&self, user_id: Option<&str>) -> Result<Vec<Token>> {
        let c = self.pool.get().await?;
        let rows = match user_id {
            Some(u) => {
                let sql = format!("SELECT {TOKEN_COLS} FROM kiln_tokens WHERE user_id = $1 ORDER BY created_at, id");
                c.query(&sql, &[&u]).await
            }
            None => {
                let sql = format!("SELECT {TOKEN_COLS} FROM kiln_tokens ORDER BY created_at, id");
                c.query(&sql, &[]).await
            }
        }
        .map_err(pg_err)?;
        rows.iter().map(to_token).collect()
    }

    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let c = self.pool.get().await?;
        let n = c
            .execute(
                "UPDATE kiln_tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                &[&id, &to_micros(now())],
            )
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Err(StoreError::Missing(format!("no token with id {id:?}")));
        }
        Ok(())
    }

    pub async fn touch_token(&self, id: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE kiln_tokens SET last_used_at = $2 WHERE id = $1",
            &[&id, &to_micros(now())],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
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
        let c = self.pool.get().await?;
        c.execute(
            &format!("INSERT INTO kiln_sessions ({SESSION_COLS}) VALUES ($1, $2, $3, $4, $5)"),
            &[
                &s.id,
                &s.user_id,
                &s.hash,
                &to_micros(s.created_at),
                &to_micros(s.expires_at),
            ],
        )
        .await
        .map_err(|e| {
            constraint(
                e,
                "a session with this cookie already exists",
                &format!("no user with id {user_id:?}"),
            )
        })?;
        Ok(s)
    }

    pub async fn session_by_hash(&self, hash: &str) -> Result<Option<Session>> {
        let mut c = self.pool.get().await?;
        let row = c
            .query_opt_cached(
                &format!("SELECT {SESSION_COLS} FROM kiln_sessions WHERE hash = $1"),
                &[&hash],
            )
            .await?;
        row.as_ref().map(to_session).transpose()
    }

    pub async fn delete_session(&self, hash: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("DELETE FROM kiln_sessions WHERE hash = $1", &[&hash])
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    pub async fn append_audit(&self, rec: AuditRecord) -> Result<u64> {
        let c = self.pool.get().await?;
        let row = c
            .query_one(
                "INSERT INTO kiln_audit (time, user_name, action, kind, organization, project, name, status, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                &[
                    &to_micros(rec.time),
                    &rec.user,
                    &rec.action,
                    &rec.kind,
                    &rec.organization,
                    &rec.project,
                    &rec.name,
                    &i32::from(rec.status),
                    &rec.outcome,
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(u64::try_from(col::<i64>(&row, 0)?).unwrap_or(0))
    }

    pub async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let s = sql::audit('$', q);
        let c = self.pool.get().await?;
        let rows = c
            .query(&s.sql, &pg_params(&s.params))
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(AuditRecord {
                    id: u64::try_from(col::<i64>(r, 0)?).unwrap_or(0),
                    time: from_micros(col(r, 1)?)?,
                    user: col(r, 2)?,
                    action: col(r, 3)?,
                    kind: col(r, 4)?,
                    organization: col(r, 5)?,
                    project: col(r, 6)?,
                    name: col(r, 7)?,
                    status: u16::try_from(col::<i32>(r, 8)?).unwrap_or(0),
                    outcome: col(r, 9)?,
                })
            })
            .collect()
    }

    pub async fn record_event(&self, ev: Event) -> Result<()> {
        let org = ev.organization.as_deref().unwrap_or("");
        let project = ev.project.as_deref().unwrap_or("");
        let keep = EVENTS_PER_OBJECT as i64;
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO kiln_object_events (time, kind, organization, project, name, type, reason, message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[&to_micros(ev.time), &ev.kind, &org, &project, &ev.name, &ev.type_, &ev.reason, &ev.message],
        )
        .await
        .map_err(pg_err)?;
        tx.execute(
            "DELETE FROM kiln_object_events WHERE kind = $1 AND organization = $2 AND project = $3 AND name = $4 \
             AND id <= (SELECT id FROM kiln_object_events WHERE kind = $1 AND organization = $2 AND project = $3 \
             AND name = $4 ORDER BY id DESC LIMIT 1 OFFSET $5)",
            &[&ev.kind, &org, &project, &ev.name, &keep],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    pub async fn list_events(
        &self,
        kind: &str,
        organization: Option<&str>,
        project: Option<&str>,
        name: &str,
        limit: usize,
    ) -> Result<Vec<Event>> {
        let (org, proj) = (organization.unwrap_or(""), project.unwrap_or(""));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT time, type, reason, message FROM kiln_object_events \
                 WHERE kind = $1 AND organization = $2 AND project = $3 AND name = $4 ORDER BY id DESC LIMIT $5",
                &[&kind, &org, &proj, &name, &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    time: from_micros(col(r, 0)?)?,
                    kind: kind.to_string(),
                    organization: organization.map(str::to_string),
                    project: project.map(str::to_string),
                    name: name.to_string(),
                    type_: col(r, 1)?,
                    reason: col(r, 2)?,
                    message: col(r, 3)?,
                })
            })
            .collect()
    }
}

impl Postgres {
    pub async fn append_logs(&self, stream: &str, lines: Vec<LogLine>) -> Result<u64> {
        // Two appenders of one stream race for the same numbers; the loser's insert fails on the key and it
        // numbers its lines again.
        loop {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await.map_err(pg_err)?;
            let last: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) FROM kiln_logs WHERE stream = $1",
                    &[&stream],
                )
                .await
                .map_err(pg_err)?
                .get(0);
            let mut seq = last;
            let mut raced = false;
            for l in &lines {
                seq += 1;
                let r = tx
                    .execute(
                        "INSERT INTO kiln_logs (stream, seq, time, source, text) VALUES ($1, $2, $3, $4, $5)",
                        &[&stream, &seq, &to_micros(l.time), &l.source, &l.text],
                    )
                    .await;
                match r {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        raced = true;
                        break;
                    }
                    Err(e) => return Err(pg_err(e)),
                }
            }
            if raced {
                continue;
            }
            match tx.commit().await {
                Ok(()) => return Ok(seq as u64),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    pub async fn last_log_seq(&self, stream: &str) -> Result<u64> {
        let c = self.pool.get().await?;
        let last: i64 = c
            .query_one(
                "SELECT COALESCE(MAX(seq), 0) FROM kiln_logs WHERE stream = $1",
                &[&stream],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        Ok(last as u64)
    }

    pub async fn read_logs(&self, stream: &str, after: u64, limit: usize) -> Result<Vec<LogLine>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT seq, time, source, text FROM kiln_logs WHERE stream = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&stream, &after, &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(LogLine {
                    seq: col::<i64>(r, 0)? as u64,
                    time: from_micros(col(r, 1)?)?,
                    source: col(r, 2)?,
                    text: col(r, 3)?,
                })
            })
            .collect()
    }

    pub async fn delete_logs(&self, stream: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("DELETE FROM kiln_logs WHERE stream = $1", &[&stream])
            .await
            .map_err(pg_err)?;
        Ok(())
    }
}

impl Postgres {
    pub async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO kiln_blobs (name, data, updated) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET data = excluded.data, updated = excluded.updated",
            &[&name, &data, &to_micros(now())],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    pub async fn create_blob(&self, name: &str, data: Vec<u8>) -> Result<bool> {
        let c = self.pool.get().await?;
        let n = c
            .execute(
                "INSERT INTO kiln_blobs (name, data, updated) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &data, &to_micros(now())],
            )
            .await
            .map_err(pg_err)?;
        Ok(n > 0)
    }

    pub async fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let c = self.pool.get().await?;
        let row = c
            .query_opt("SELECT data FROM kiln_blobs WHERE name = $1", &[&name])
            .await
            .map_err(pg_err)?;
        row.map(|r| col::<Vec<u8>>(&r, 0)).transpose()
    }

    pub async fn blob_names(&self, prefix: &str) -> Result<Vec<String>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT name FROM kiln_blobs WHERE left(name, length($1)) = $1 ORDER BY name",
                &[&prefix],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(|r| col::<String>(r, 0)).collect()
    }

    pub async fn delete_blob(&self, name: &str) -> Result<bool> {
        let c = self.pool.get().await?;
        let n = c
            .execute("DELETE FROM kiln_blobs WHERE name = $1", &[&name])
            .await
            .map_err(pg_err)?;
        Ok(n > 0)
    }
}
