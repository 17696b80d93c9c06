//! Resource documents as the API takes them (YAML or JSON): never a panic,
//! and what is accepted is written back as a document that reads back to
//! the same resource (an omitted namespace is `default` in both).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::{config::object_body, parse_documents};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = parse_documents(text) else {
        return;
    };
    for resource in resources {
        let body = object_body(&resource);
        let again = parse_documents(std::str::from_utf8(&body).expect("JSON is UTF-8"))
            .unwrap_or_else(|problems| panic!("{resource:?} re-read: {problems:?}"));
        assert_eq!(again.len(), 1, "{resource:?}");
        assert_eq!(again[0], resource, "{body:?}");
    }
});
