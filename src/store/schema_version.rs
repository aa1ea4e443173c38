//! Synapse's record of its database schema (`schema/common/schema_version.sql`):
//! the version its code last brought it to, the oldest code version that
//! may still read it, and the deltas applied at that version.

use super::Store;
use super::sql::Sql;

/// What `schema_version`, `schema_compat_version` and
/// `applied_schema_deltas` hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaState {
    pub version: i64,
    /// False while a full schema was being laid down (Synapse's `upgraded`).
    pub upgraded: bool,
    /// `None` for a database no compat-aware Synapse has opened.
    pub compat_version: Option<i64>,
    /// Deltas applied at `version`.
    pub deltas_at_version: i64,
    /// A PostgreSQL database at schema 92 without the delta Synapse 1.139
    /// added: its Synapse is 1.136 to 1.138 (the schema cannot tell them
    /// apart, and SQLite databases do not record that delta).
    pub before_1_139: bool,
}

#[derive(sqlx::FromRow)]
struct Row {
    version: i64,
    upgraded: bool,
    compat_version: Option<i64>,
    deltas: i64,
    before_1_139: bool,
}

/// One round trip. A database without these tables has no Synapse schema.
const STATE: Sql = Sql {
    pg: "SELECT CAST(v.version AS BIGINT) AS version, v.upgraded AS upgraded, \
         (SELECT CAST(MAX(c.compat_version) AS BIGINT) FROM schema_compat_version c) AS compat_version, \
         (SELECT COUNT(*) FROM applied_schema_deltas d WHERE d.version = v.version) AS deltas, \
         (v.version = 92 AND NOT EXISTS (SELECT 1 FROM applied_schema_deltas d \
            WHERE d.file = '92/08_thread_subscriptions_seq_fixup.sql.postgres')) AS before_1_139 \
         FROM schema_version v",
    sqlite: "SELECT CAST(v.version AS BIGINT) AS version, v.upgraded AS upgraded, \
         (SELECT CAST(MAX(c.compat_version) AS BIGINT) FROM schema_compat_version c) AS compat_version, \
         (SELECT COUNT(*) FROM applied_schema_deltas d WHERE d.version = v.version) AS deltas, \
         FALSE AS before_1_139 \
         FROM schema_version v",
};

impl Store {
    /// Synapse's schema record; `None` when there is none (not a Synapse
    /// database, or one Synapse never finished creating).
    pub async fn schema_state(&self) -> Result<Option<SchemaState>, sqlx::Error> {
        match self.fetch_optional::<Row>(&STATE, &[]).await {
            Ok(row) => Ok(row.map(|r| SchemaState {
                version: r.version,
                upgraded: r.upgraded,
                compat_version: r.compat_version,
                deltas_at_version: r.deltas,
                before_1_139: r.before_1_139,
            })),
            Err(e) if no_such_table(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// PostgreSQL's `undefined_table`, SQLite's "no such table".
fn no_such_table(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.code().as_deref() == Some("42P01") || d.message().starts_with("no such table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn synapses_record_is_read_and_its_absence_is_none() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        let store = Store::Sqlite(pool.clone());
        assert_eq!(store.schema_state().await.unwrap(), None);
        for ddl in [
            "CREATE TABLE schema_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, version INTEGER NOT NULL, upgraded BOOL NOT NULL)",
            "CREATE TABLE schema_compat_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, compat_version INTEGER NOT NULL)",
            "CREATE TABLE applied_schema_deltas (version INTEGER NOT NULL, file TEXT NOT NULL, UNIQUE(version, file))",
            "INSERT INTO schema_version (version, upgraded) VALUES (93, 1)",
            "INSERT INTO applied_schema_deltas VALUES (92, 'a.sql'), (93, 'b.sql'), (93, 'c.sql')",
        ] {
            sqlx::query(ddl).execute(&pool).await.unwrap();
        }
        let read = store.schema_state().await.unwrap().unwrap();
        assert_eq!(read, SchemaState { version: 93, upgraded: true, compat_version: None, deltas_at_version: 2, before_1_139: false });
        sqlx::query("INSERT INTO schema_compat_version (compat_version) VALUES (84)").execute(&pool).await.unwrap();
        assert_eq!(store.schema_state().await.unwrap().unwrap().compat_version, Some(84));
    }
}
