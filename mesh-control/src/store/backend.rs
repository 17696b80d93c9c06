//! The two SQL dialects the store speaks. Queries are written once; the few
//! places where the backends differ (native PostgreSQL types, how "now" is
//! spelled) go through these helpers. Values are always bound as
//! parameters, never spliced into SQL text.

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names.
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The current time, as the `updated_at` columns store it.
    pub const fn now(self) -> &'static str {
        match self {
            Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            Backend::Postgres => "NOW()",
        }
    }

    /// A JSON parameter (`$n`) as the column type expects it.
    pub fn json_param(self, param: &str) -> String {
        match self {
            Backend::Sqlite => param.to_owned(),
            Backend::Postgres => format!("CAST({param} AS JSONB)"),
        }
    }

    /// An address parameter.
    pub fn inet_param(self, param: &str) -> String {
        match self {
            Backend::Sqlite => param.to_owned(),
            Backend::Postgres => format!("CAST({param} AS INET)"),
        }
    }

    /// A timestamp parameter given as RFC 3339 text.
    pub fn time_param(self, param: &str) -> String {
        match self {
            Backend::Sqlite => param.to_owned(),
            Backend::Postgres => format!("CAST({param} AS TIMESTAMPTZ)"),
        }
    }

    /// A JSON column read back as text.
    pub fn json_column(self, column: &str) -> String {
        match self {
            Backend::Sqlite => column.to_owned(),
            Backend::Postgres => format!("CAST({column} AS TEXT) AS {column}"),
        }
    }

    /// An address column read back as the bare address.
    pub fn inet_column(self, column: &str) -> String {
        match self {
            Backend::Sqlite => column.to_owned(),
            Backend::Postgres => format!("host({column}) AS {column}"),
        }
    }

    /// A timestamp column read back as RFC 3339 text, UTC, milliseconds.
    pub fn time_column(self, column: &str) -> String {
        match self {
            Backend::Sqlite => column.to_owned(),
            Backend::Postgres => format!(
                "to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS {column}"
            ),
        }
    }

    /// The statement that opens a write transaction. SQLite takes the write
    /// lock up front, so concurrent writers queue on the busy timeout instead
    /// of failing when a read lock cannot be upgraded.
    pub const fn begin_write(self) -> &'static str {
        match self {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }
}
