//! Issue 23: the shipped Prometheus alerting rules are valid and their unit tests pass
//! (`promtool check rules`, `promtool test rules`: config/alerts.test.yml makes each alert fire
//! when it must and stay quiet when it must not). `.ci/run` installs promtool (Debian's
//! `prometheus` package); without it this test says so and checks nothing.

use std::path::Path;
use std::process::Command;

fn promtool() -> Option<&'static str> {
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "promtool")
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED: promtool not found; install it with `apt-get install -y prometheus` \
             (.ci/run does) to check config/alerts.yml"
        );
        return;
    };
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(&config)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
