//! Collecting validation problems, each with the path of the field.

use std::fmt;

use serde::Serialize;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path from the document root, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// The problems found in one document, in the order found.
#[derive(Debug, Default)]
pub struct FieldErrors {
    prefix: String,
    errors: Vec<FieldError>,
}

impl FieldErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem with the field `field` (relative to the current
    /// prefix).
    pub fn add(&mut self, field: &str, message: impl Into<String>) {
        let field = match (self.prefix.is_empty(), field.is_empty()) {
            (true, _) => field.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) if field.starts_with('[') => format!("{}{field}", self.prefix),
            (false, false) => format!("{}.{field}", self.prefix),
        };
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }

    /// Runs `f` with `field` appended to the prefix of every problem it adds.
    pub fn nested(&mut self, field: &str, f: impl FnOnce(&mut Self)) {
        let saved = self.prefix.clone();
        self.prefix = match (saved.is_empty(), field.starts_with('[')) {
            (true, _) | (false, true) => format!("{saved}{field}"),
            (false, false) => format!("{saved}.{field}"),
        };
        f(self);
        self.prefix = saved;
    }

    /// Checks `min <= value <= max`, naming the bound that was crossed.
    pub fn range<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) {
        if value < min {
            self.add(field, format!("must be >= {min} (got {value})"));
        } else if value > max {
            self.add(field, format!("must be <= {max} (got {value})"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldError> {
        self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_paths_join_with_dots_and_brackets() {
        let mut errors = FieldErrors::new();
        errors.nested("spec", |e| {
            e.add("v1_weight", "bad");
            e.nested("ports", |e| e.nested("[2]", |e| e.add("port", "bad")));
            e.nested("ports", |e| e.add("[0]", "bad"));
        });
        errors.add("metadata.name", "bad");
        let fields: Vec<String> = errors.into_vec().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.v1_weight",
                "spec.ports[2].port",
                "spec.ports[0]",
                "metadata.name"
            ]
        );
    }

    #[test]
    fn range_names_the_bound() {
        let mut errors = FieldErrors::new();
        errors.range("a", -5, 0, 10);
        errors.range("b", 11, 0, 10);
        errors.range("c", 5, 0, 10);
        let messages: Vec<String> = errors.into_vec().iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            ["a: must be >= 0 (got -5)", "b: must be <= 10 (got 11)"]
        );
    }
}
