//! A configuration push as the node receives it: bytes decoded as the
//! gRPC message, then validated and applied to the configuration it
//! holds. Never a panic; an accepted push leaves exactly what it says:
//! its revision, each resource it sends at its version, none it removes.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mesh_api::v1::DeltaResponse;
use mesh_model::config::NodeConfig;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = DeltaResponse::decode(data) else {
        return;
    };
    // What the message says, read back from its own encoding.
    let again = DeltaResponse::decode(response.encode_to_vec().as_slice())
        .expect("an encoded message decodes");
    assert_eq!(again, response);
    let mut sent: BTreeMap<&str, &str> = BTreeMap::new();
    for resource in &response.resources {
        sent.insert(&resource.name, &resource.version);
    }
    let Ok(next) = mesh_node::xds::validate(&NodeConfig::default(), response.clone()) else {
        return;
    };
    assert_eq!(next.revision, response.revision);
    let held = next.versions();
    for (name, version) in &sent {
        assert_eq!(held.get(*name).map(String::as_str), Some(*version), "{name}");
    }
    for name in &response.removed_resources {
        assert!(
            sent.contains_key(name.as_str()) || !held.contains_key(name),
            "{name} was removed but is held"
        );
    }
    assert_eq!(held.len(), sent.len());
});
