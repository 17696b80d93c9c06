//! SPIFFE IDs as policies and certificates carry them: never a panic, and
//! an accepted one prints as it parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_identity::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        let printed = id.to_string();
        assert_eq!(SpiffeId::parse(&printed).as_ref(), Ok(&id), "{text:?}");
    }
});
