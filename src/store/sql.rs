//! The one way a query reaches either database: a statement written once
//! per dialect ([`Sql`]), its parameters ([`Arg`]), and [`Store::fetch_all`]
//! / [`Store::fetch_optional`] / [`Store::fetch_one`] to run it.
//!
//! Lists go in as one parameter: a PostgreSQL array, or a JSON array that
//! SQLite reads with `json_each`. So a query costs one round trip however
//! many users it names, and its text is fixed (the driver's statement cache
//! applies).
//!
//! Strings PostgreSQL cannot hold (a NUL) are never sent: they cannot be
//! stored, so cannot match. A scalar one makes the query match nothing; a
//! list drops them. A list that every selected row must be a member of
//! ([`Arg::any_of`]) and that is (left) empty matches nothing without a
//! round trip.

use std::borrow::Cow;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryAs;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{FromRow, Postgres, Sqlite};

use super::Store;

/// One statement in both dialects.
pub(super) struct Sql {
    pub pg: &'static str,
    pub sqlite: &'static str,
}

impl Sql {
    /// A statement both databases read the same way.
    pub const fn same(text: &'static str) -> Self {
        Self { pg: text, sqlite: text }
    }
}

/// A statement parameter, in the order of `$1`, `$2`... (`?1`, `?2`...).
#[derive(Debug, Clone)]
pub(super) enum Arg<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    /// A list of strings; `every_row_a_member`: the query selects only
    /// rows whose column is one of them.
    Texts {
        items: Cow<'a, [&'a str]>,
        every_row_a_member: bool,
    },
}

impl<'a> Arg<'a> {
    /// A list every selected row is a member of (`WHERE x = ANY($n)`).
    pub fn any_of(items: &'a [&'a str]) -> Self {
        Arg::Texts { items: Cow::Borrowed(items), every_row_a_member: true }
    }

    /// A list that filters only a part of the query.
    pub fn list(items: &'a [&'a str]) -> Self {
        Arg::Texts { items: Cow::Borrowed(items), every_row_a_member: false }
    }
}

/// Whether a string can be stored in (so found in) Synapse's database.
fn storable(s: &str) -> bool {
    !s.contains('\0')
}

/// `args` as they are sent, or `None` when the query can match nothing.
fn storable_args<'a>(args: &[Arg<'a>]) -> Option<Vec<Arg<'a>>> {
    args.iter()
        .map(|a| match a {
            Arg::Text(s) | Arg::OptText(Some(s)) if !storable(s) => None,
            Arg::Texts { items, every_row_a_member } if items.iter().any(|s| !storable(s)) => Some(Arg::Texts {
                items: Cow::Owned(items.iter().copied().filter(|s| storable(s)).collect()),
                every_row_a_member: *every_row_a_member,
            }),
            other => Some(other.clone()),
        })
        .map(|a| a.filter(|a| !matches!(a, Arg::Texts { items, every_row_a_member: true } if items.is_empty())))
        .collect()
}

fn bind_pg<'q, 'a: 'q, R>(mut q: QueryAs<'q, Postgres, R, PgArguments>, args: &'q [Arg<'a>]) -> QueryAs<'q, Postgres, R, PgArguments> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(*s),
            Arg::OptText(s) => q.bind(*s),
            Arg::Int(i) => q.bind(*i),
            Arg::Texts { items, .. } => q.bind(&items[..]),
        };
    }
    q
}

fn bind_sqlite<'q, 'a: 'q, R>(
    mut q: QueryAs<'q, Sqlite, R, SqliteArguments>,
    args: &'q [Arg<'a>],
) -> QueryAs<'q, Sqlite, R, SqliteArguments> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(*s),
            Arg::OptText(s) => q.bind(*s),
            Arg::Int(i) => q.bind(*i),
            Arg::Texts { items, .. } => q.bind(serde_json::to_string(&items[..]).expect("strings serialise")),
        };
    }
    q
}

/// [`Store::fetch_all`] on a PostgreSQL connection of its own.
pub(super) async fn fetch_all_on<R: Row>(conn: &mut sqlx::PgConnection, sql: &Sql, args: &[Arg<'_>]) -> Result<Vec<R>, sqlx::Error> {
    let Some(args) = storable_args(args) else { return Ok(Vec::new()) };
    bind_pg(sqlx::query_as(sql.pg), &args).fetch_all(conn).await
}

/// A row type either database can produce.
pub(super) trait Row: Send + Unpin + for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> {}
impl<T: Send + Unpin + for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow>> Row for T {}

impl Store {
    /// Every row `sql` selects.
    pub(super) async fn fetch_all<R: Row>(&self, sql: &Sql, args: &[Arg<'_>]) -> Result<Vec<R>, sqlx::Error> {
        let Some(args) = storable_args(args) else { return Ok(Vec::new()) };
        match self {
            Store::Postgres(p) => p.run(async |c| bind_pg(sqlx::query_as(sql.pg), &args).fetch_all(c).await).await,
            Store::Sqlite(p) => bind_sqlite(sqlx::query_as(sql.sqlite), &args).fetch_all(p).await,
        }
    }

    /// The first row `sql` selects, if any.
    pub(super) async fn fetch_optional<R: Row>(&self, sql: &Sql, args: &[Arg<'_>]) -> Result<Option<R>, sqlx::Error> {
        let Some(args) = storable_args(args) else { return Ok(None) };
        match self {
            Store::Postgres(p) => p.run(async |c| bind_pg(sqlx::query_as(sql.pg), &args).fetch_optional(c).await).await,
            Store::Sqlite(p) => bind_sqlite(sqlx::query_as(sql.sqlite), &args).fetch_optional(p).await,
        }
    }

    /// The one row an aggregate without parameters selects.
    pub(super) async fn fetch_one<R: Row>(&self, sql: &Sql) -> Result<R, sqlx::Error> {
        match self {
            Store::Postgres(p) => p.run(async |c| sqlx::query_as(sql.pg).fetch_one(c).await).await,
            Store::Sqlite(p) => sqlx::query_as(sql.sqlite).fetch_one(p).await,
        }
    }

    /// The first column of every row `sql` selects.
    pub(super) async fn fetch_column(&self, sql: &Sql, args: &[Arg<'_>]) -> Result<Vec<String>, sqlx::Error> {
        Ok(self.fetch_all::<(String,)>(sql, args).await?.into_iter().map(|(s,)| s).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstorable_strings_are_never_sent() {
        let list = ["@a:hs", "@b\0:hs"];
        let sent = storable_args(&[Arg::any_of(&list), Arg::Int(1)]).unwrap();
        assert!(matches!(&sent[0], Arg::Texts { items, .. } if items[..] == ["@a:hs"]));
        assert!(storable_args(&[Arg::Text("tok\0en")]).is_none());
        assert!(storable_args(&[Arg::OptText(Some("\0"))]).is_none());
        assert!(storable_args(&[Arg::OptText(None)]).is_some());
        let only_bad = ["\0"];
        assert!(storable_args(&[Arg::any_of(&only_bad)]).is_none(), "a list left empty matches nothing");
        assert!(storable_args(&[Arg::any_of(&[])]).is_none());
        let sent = storable_args(&[Arg::list(&only_bad)]).expect("a partial filter is still sent");
        assert!(matches!(&sent[0], Arg::Texts { items, .. } if items.is_empty()));
    }
}
