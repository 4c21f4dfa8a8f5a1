//! A small PostgreSQL connection pool: at most `size` connections, opened on demand, returned on drop unless
//! the connection broke. Each connection keeps the statements prepared on it, so a hot lookup costs one round
//! trip instead of two (prepare, then execute).

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Row, Statement};

use crate::{Result, StoreError};

/// Maps a driver error to a store error, keeping the server's message and SQLSTATE.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Backend(format!(
            "postgres: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        )),
        None => StoreError::Backend(format!("postgres: {e}")),
    }
}

/// Opens one connection and drives it on a background task.
pub(crate) async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

pub(crate) struct Pool {
    pub config: Config,
    idle: Mutex<Vec<Pooled>>,
    permits: Semaphore,
}

/// A connection and the statements prepared on it, by SQL text.
struct Pooled {
    client: Client,
    statements: HashMap<String, Statement>,
}

/// A pooled connection; dereferences to the client.
pub(crate) struct Conn<'a> {
    client: Option<Pooled>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Pool {
    pub fn new(config: Config, size: usize) -> Pool {
        Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size),
        }
    }

    /// Waits for a free slot, then reuses an idle connection or opens a new one.
    pub async fn get(&self) -> Result<Conn<'_>> {
        let permit =
            self.permits.acquire().await.map_err(|_| {
                StoreError::Backend("postgres: the connection pool is closed".into())
            })?;
        loop {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(c) if c.client.is_closed() => continue,
                Some(c) => {
                    return Ok(Conn {
                        client: Some(c),
                        pool: self,
                        _permit: permit,
                    })
                }
                None => break,
            }
        }
        let client = connect(&self.config).await?;
        Ok(Conn {
            client: Some(Pooled {
                client,
                statements: HashMap::new(),
            }),
            pool: self,
            _permit: permit,
        })
    }
}

impl Conn<'_> {
    fn pooled(&mut self) -> &mut Pooled {
        // Invariant: `client` is only taken in `drop`.
        self.client
            .as_mut()
            .expect("pooled connection used after drop")
    }

    /// Runs a statement that returns at most one row, preparing it once per connection.
    pub async fn query_opt_cached(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        let pooled = self.pooled();
        let statement = match pooled.statements.get(sql) {
            Some(s) => s.clone(),
            None => {
                let s = pooled.client.prepare(sql).await.map_err(pg_err)?;
                pooled.statements.insert(sql.to_string(), s.clone());
                s
            }
        };
        pooled
            .client
            .query_opt(&statement, params)
            .await
            .map_err(pg_err)
    }
}

impl Deref for Conn<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        // Invariant: `client` is only taken in `drop`.
        &self
            .client
            .as_ref()
            .expect("pooled connection used after drop")
            .client
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.pooled().client
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
        }
    }
}
