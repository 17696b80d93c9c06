//! A pushed configuration resource as a node validates it (its name, a
//! NUL, its body): never a panic; an accepted object is named as it says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::config::{ConfigResource, object_body, object_name, parse_resource};

fuzz_target!(|data: &[u8]| {
    let (name, body) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    if let Ok(ConfigResource::Object(resource)) = parse_resource(name, body) {
        assert_eq!(object_name(&resource), name);
        let again = parse_resource(name, &object_body(&resource));
        assert!(
            matches!(&again, Ok(ConfigResource::Object(same)) if *same == resource),
            "{resource:?} re-read as {again:?}"
        );
    }
});
