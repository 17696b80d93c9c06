//! Reading typed values out of `Any` rows, with errors that name the row.

use serde::de::DeserializeOwned;
use sqlx::{Row as _, any::AnyRow};

use super::StoreError;

/// Reads columns of one row; `reference` names the row in errors.
pub(super) struct Columns<'r> {
    row: &'r AnyRow,
    reference: String,
}

impl<'r> Columns<'r> {
    pub(super) fn new(row: &'r AnyRow, reference: String) -> Self {
        Self { row, reference }
    }

    pub(super) fn reference(&self) -> &str {
        &self.reference
    }

    fn corrupt(&self, column: &str, error: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            reference: self.reference.clone(),
            message: format!("column {column}: {error}"),
        }
    }

    pub(super) fn text(&self, column: &str) -> Result<String, StoreError> {
        self.row
            .try_get(column)
            .map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.row
            .try_get(column)
            .map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.row
            .try_get(column)
            .map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.row
            .try_get(column)
            .map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn int32(&self, column: &str) -> Result<i32, StoreError> {
        let value = self.int(column)?;
        i32::try_from(value).map_err(|e| self.corrupt(column, e))
    }

    /// PostgreSQL returns booleans; SQLite stores them as 0 and 1.
    pub(super) fn boolean(&self, column: &str) -> Result<bool, StoreError> {
        match self.row.try_get::<bool, _>(column) {
            Ok(value) => Ok(value),
            Err(_) => Ok(self.int(column)? != 0),
        }
    }

    pub(super) fn json<T: DeserializeOwned>(&self, column: &str) -> Result<T, StoreError> {
        let text = self.text(column)?;
        serde_json::from_str(&text).map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn opt_json<T: DeserializeOwned>(
        &self,
        column: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.opt_text(column)? {
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| self.corrupt(column, e)),
            None => Ok(None),
        }
    }

    pub(super) fn parse<T: std::str::FromStr>(&self, column: &str) -> Result<T, StoreError>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.text(column)?;
        text.parse().map_err(|e| self.corrupt(column, e))
    }

    pub(super) fn opt_parse<T: std::str::FromStr>(
        &self,
        column: &str,
    ) -> Result<Option<T>, StoreError>
    where
        T::Err: std::fmt::Display,
    {
        self.opt_text(column)?
            .map(|text| text.parse().map_err(|e| self.corrupt(column, e)))
            .transpose()
    }
}

/// Serialises a value bound as a JSON parameter.
pub(super) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("resource fields are plain data and always serialize")
}

/// A time as the store writes it (RFC 3339); `what` names it in the error.
pub(super) fn rfc3339(at: time::OffsetDateTime, what: &str) -> Result<String, StoreError> {
    at.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| StoreError::Corrupt {
            reference: what.into(),
            message: e.to_string(),
        })
}
