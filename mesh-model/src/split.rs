//! TrafficSplit: weighted canary routing between a service's v1 and v2,
//! with header matches that force v2 (the seed's `X-Canary: true`), and the
//! pure choice of version for one request.

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::{
    FieldErrors, Kind, Metadata,
    names::{check_dns_label, check_header_name, quoted},
    resource::Spec,
};

/// Largest weight accepted; weights are relative, so this is plenty.
pub const MAX_WEIGHT: i32 = 1_000_000;
/// The most header matches one split may carry.
pub const MAX_HEADER_MATCHES: usize = 16;
/// Largest compiled regex accepted in a header match, in bytes.
pub const MAX_REGEX_SIZE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitSpec {
    /// The service (in this namespace) whose traffic is split.
    pub destination: String,
    /// Only calls from this service are split; absent: every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default = "d_v1_weight")]
    pub v1_weight: i32,
    #[serde(default)]
    pub v2_weight: i32,
    /// Requests carrying any of these headers go to v2, whatever the
    /// weights: header name -> value (exact) or `{exact|prefix|regex: ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_match: Option<BTreeMap<String, HeaderMatch>>,
}

fn d_v1_weight() -> i32 {
    100
}

/// How one header's value is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderMatch {
    /// The seed's form: `{"x-canary": "true"}`.
    Exact(String),
    Rule(MatchRule),
}

/// Exactly one of `exact`, `prefix`, `regex` (the regex must match the
/// whole value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

impl Spec for TrafficSplitSpec {
    const KIND: Kind = Kind::TrafficSplit;

    fn validate(&self, _metadata: &Metadata, errors: &mut FieldErrors) {
        if let Err(why) = check_dns_label(&self.destination) {
            errors.add("destination", why);
        }
        if let Some(source) = &self.source
            && let Err(why) = check_dns_label(source)
        {
            errors.add("source", why);
        }
        errors.range("v1_weight", self.v1_weight, 0, MAX_WEIGHT);
        errors.range("v2_weight", self.v2_weight, 0, MAX_WEIGHT);
        if self.v1_weight >= 0 && self.v2_weight >= 0 && self.v1_weight + self.v2_weight == 0 {
            errors.add(
                "v2_weight",
                "v1_weight + v2_weight must be > 0 (both are 0)",
            );
        }
        let Some(matches) = &self.header_match else {
            return;
        };
        if matches.is_empty() {
            errors.add(
                "header_match",
                "must list at least one header, or be left out",
            );
        }
        if matches.len() > MAX_HEADER_MATCHES {
            errors.add(
                "header_match",
                format!(
                    "at most {MAX_HEADER_MATCHES} headers (got {})",
                    matches.len()
                ),
            );
            return;
        }
        for (header, rule) in matches {
            let field = format!("header_match[{}]", quoted(header));
            if let Err(why) = check_header_name(header) {
                errors.add(&field, why);
            }
            if let HeaderMatch::Rule(rule) = rule {
                let set = [&rule.exact, &rule.prefix, &rule.regex]
                    .iter()
                    .filter(|v| v.is_some())
                    .count();
                if set != 1 {
                    errors.add(
                        &field,
                        format!("must set exactly one of exact, prefix, regex (got {set})"),
                    );
                } else if let Some(pattern) = &rule.regex
                    && let Err(error) = compile(pattern)
                {
                    errors.add(&format!("{field}.regex"), format!("invalid regex: {error}"));
                }
            }
        }
    }
}

fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_SIZE)
        .build()
}

/// The version a request is routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub const fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// A split ready to route requests: header matches compiled once.
#[derive(Clone, Debug)]
pub struct SplitRule {
    v1_weight: u32,
    v2_weight: u32,
    matches: Vec<(String, Matcher)>,
}

#[derive(Clone, Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl SplitRule {
    /// Builds the rule of a validated spec.
    pub fn new(spec: &TrafficSplitSpec) -> Result<Self, regex::Error> {
        let mut matches = Vec::new();
        for (header, rule) in spec.header_match.iter().flatten() {
            let matcher = match rule {
                HeaderMatch::Exact(value) => Matcher::Exact(value.clone()),
                HeaderMatch::Rule(MatchRule { exact: Some(v), .. }) => Matcher::Exact(v.clone()),
                HeaderMatch::Rule(MatchRule {
                    prefix: Some(v), ..
                }) => Matcher::Prefix(v.clone()),
                HeaderMatch::Rule(MatchRule { regex: Some(v), .. }) => Matcher::Regex(compile(v)?),
                HeaderMatch::Rule(_) => continue,
            };
            matches.push((header.clone(), matcher));
        }
        Ok(Self {
            v1_weight: spec.v1_weight.max(0) as u32,
            v2_weight: spec.v2_weight.max(0) as u32,
            matches,
        })
    }

    /// Sum of the weights: a random roll is drawn from `1..=total`.
    pub fn total_weight(&self) -> u32 {
        self.v1_weight + self.v2_weight
    }

    /// The seed's `compute_traffic_split`: a header match sends the request
    /// to v2; otherwise `roll` (uniform in `1..=total_weight()`) picks v2
    /// when it falls within v2's weight. A zero total routes to v1.
    pub fn choose<'h>(&self, header: impl Fn(&str) -> Option<&'h str>, roll: u32) -> Version {
        let forced = self.matches.iter().any(|(name, matcher)| {
            header(name).is_some_and(|value| match matcher {
                Matcher::Exact(expected) => value == expected,
                Matcher::Prefix(prefix) => value.starts_with(prefix.as_str()),
                Matcher::Regex(regex) => regex.is_match(value),
            })
        });
        if forced {
            return Version::V2;
        }
        if self.total_weight() == 0 {
            return Version::V1;
        }
        if roll <= self.v2_weight {
            Version::V2
        } else {
            Version::V1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v1: i32, v2: i32, header_match: Option<serde_json::Value>) -> TrafficSplitSpec {
        TrafficSplitSpec {
            destination: "reviews".into(),
            source: None,
            v1_weight: v1,
            v2_weight: v2,
            header_match: header_match.map(|v| serde_json::from_value(v).unwrap()),
        }
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    #[test]
    fn weights_split_rolls_exactly() {
        let rule = SplitRule::new(&spec(95, 5, None)).unwrap();
        assert_eq!(rule.total_weight(), 100);
        let v2 = (1..=100)
            .filter(|&roll| rule.choose(headers(&[]), roll) == Version::V2)
            .count();
        assert_eq!(v2, 5);
    }

    #[test]
    fn header_match_forces_v2_whatever_the_weights() {
        let rule = SplitRule::new(&spec(
            100,
            0,
            Some(serde_json::json!({
                "x-canary": "true",
                "x-user": {"prefix": "qa-"},
                "x-build": {"regex": "b[0-9]+"},
            })),
        ))
        .unwrap();
        assert_eq!(
            rule.choose(headers(&[("x-canary", "true")]), 1),
            Version::V2
        );
        assert_eq!(
            rule.choose(headers(&[("x-canary", "false")]), 1),
            Version::V1
        );
        assert_eq!(
            rule.choose(headers(&[("x-user", "qa-ann")]), 1),
            Version::V2
        );
        assert_eq!(rule.choose(headers(&[("x-build", "b42")]), 1), Version::V2);
        // The regex matches the whole value.
        assert_eq!(rule.choose(headers(&[("x-build", "b42x")]), 1), Version::V1);
    }

    #[test]
    fn zero_total_routes_to_v1() {
        let rule = SplitRule::new(&spec(0, 0, None)).unwrap();
        assert_eq!(rule.choose(headers(&[]), 0), Version::V1);
    }

    fn problems(spec: &TrafficSplitSpec) -> Vec<String> {
        let mut errors = FieldErrors::new();
        spec.validate(&Metadata::default(), &mut errors);
        errors.into_vec().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn validation_reports_every_problem() {
        let bad = spec(
            -1,
            -5,
            Some(
                serde_json::json!({"X-Bad": "1", "x-ok": {"exact": "a", "prefix": "b"}, "x-re": {"regex": "("}}),
            ),
        );
        let found = problems(&bad);
        assert!(
            found.contains(&"v1_weight: must be >= 0 (got -1)".to_owned()),
            "{found:?}"
        );
        assert!(
            found.contains(&"v2_weight: must be >= 0 (got -5)".to_owned()),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("header_match[\"X-Bad\"]: ")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("exactly one of exact, prefix, regex (got 2)")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("header_match[\"x-re\"].regex: invalid regex")),
            "{found:?}"
        );
        assert_eq!(
            problems(&spec(0, 0, None)),
            ["v2_weight: v1_weight + v2_weight must be > 0 (both are 0)"]
        );
        assert!(problems(&spec(95, 5, None)).is_empty());
    }
}
