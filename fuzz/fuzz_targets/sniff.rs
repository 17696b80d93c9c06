//! The first bytes of a connection on a port of undeclared protocol:
//! never a panic, whatever arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::l7::sniff::sniff;

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
});
