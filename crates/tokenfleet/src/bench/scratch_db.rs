//! A throwaway PostgreSQL database for a benchmark's job store: created in the cluster an
//! operator names (a URL whose role may create databases), dropped when the bench ends, so a
//! run never loads another run's unfinished jobs. Uses tokio-postgres only.

use anyhow::Context;
use tokio_postgres::NoTls;

pub struct ScratchDatabase {
    /// The new database's URL (the server URL with its database name replaced).
    pub url: String,
    admin_url: String,
    name: String,
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "connecting to the PostgreSQL server for the bench's store")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl ScratchDatabase {
    /// `server_url`: `postgresql://user@host:port/db` (any existing database to connect to).
    pub async fn create(server_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let (base, query) = match server_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (server_url, String::new()),
        };
        let (host, _) = base
            .rsplit_once('/')
            .filter(|(h, _)| h.contains("://"))
            .context("the PostgreSQL URL must end in /<database>")?;
        let name = format!("{prefix}_{}", hex::encode(rand::random::<[u8; 6]>()));
        connect(server_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating the bench's database {name}"))?;
        Ok(Self {
            url: format!("{host}/{name}{query}"),
            admin_url: server_url.to_string(),
            name,
        })
    }

    /// Drops the database (its sessions ended first).
    pub async fn drop_now(self) -> anyhow::Result<()> {
        connect(&self.admin_url)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping the bench's database {}", self.name))
    }
}
