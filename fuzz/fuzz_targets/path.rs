//! Request paths as authorization sees them: never a panic; a normalised
//! path is absolute, has no empty, `.` or `..` segment, and normalises to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::l7::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = normalize(target) else {
        return;
    };
    assert!(path.starts_with('/'), "{target:?} → {path:?}");
    if path != "/" {
        for segment in path[1..].split('/') {
            assert!(!matches!(segment, "." | ".."), "{target:?} → {path:?}");
        }
        assert!(!path.contains("//"), "{target:?} → {path:?}");
    }
    assert_eq!(normalize(&path).as_deref(), Ok(path.as_str()), "{target:?}");
});
