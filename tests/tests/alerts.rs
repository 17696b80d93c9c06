//! The alerting rules in `deploy/prometheus`: valid for Prometheus, and
//! firing when, and only when, their unit tests say (`promtool`).

use std::{path::Path, process::Command};

#[test]
fn the_alerting_rules_are_valid_and_fire_as_their_unit_tests_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "mesh-alerts.yaml"],
        ["test", "rules", "mesh-alerts.test.yaml"],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian package prometheus; cargo xtask test installs it)");
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
