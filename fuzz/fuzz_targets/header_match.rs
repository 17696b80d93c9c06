//! Traffic splits with header matches: a spec the API accepts always
//! builds its rule (its regexes compile within their limits), and choosing
//! never panics, whatever the header values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::{Resource, parse_documents, split::SplitRule};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line is the header_match map (JSON), the rest header
    // values, one per line.
    let (rules, values) = text.split_once('\n').unwrap_or((text, ""));
    let document = format!(
        "{{\"apiVersion\": \"mesh.io/v1\", \"kind\": \"TrafficSplit\", \
          \"metadata\": {{\"name\": \"s\", \"namespace\": \"shop\"}}, \
          \"spec\": {{\"destination\": \"reviews\", \"v1_weight\": 50, \"v2_weight\": 50, \
          \"header_match\": {rules}}}}}"
    );
    let Ok(resources) = parse_documents(&document) else {
        return;
    };
    let Some(Resource::TrafficSplit(split)) = resources.first() else {
        return;
    };
    let rule = SplitRule::new(&split.spec)
        .unwrap_or_else(|error| panic!("an accepted spec does not build: {error}"));
    let values: Vec<&str> = values.lines().collect();
    for roll in [1, 50, 100] {
        let _ = rule.choose(
            |name| {
                let index = name.len() % values.len().max(1);
                values.get(index).copied()
            },
            roll,
        );
    }
});
