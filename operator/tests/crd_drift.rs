//! The committed CRD (`crds/mailqueues.postern.dev.yaml`) and the chart's CRD
//! template must be exactly what `postern-operator crd` prints from the Rust
//! types; `POSTERN_UPDATE_SNAPSHOTS=1` regenerates both.

mod common;

use postern_operator::crd;

const CRD_FILE: &str = "crds/mailqueues.postern.dev.yaml";
const CHART_CRD: &str = "charts/postern/templates/crd.yaml";

#[test]
fn crd_printed_by_the_binary_is_the_committed_one() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_postern-operator"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed, crd::crd_yaml(), "`crd` prints crd_yaml()");
    common::assert_file(CRD_FILE, &printed);
}

#[test]
fn chart_crd_template_is_generated_from_the_types() {
    common::assert_file(CHART_CRD, &crd::chart_crd_template());
}

#[test]
fn crd_yaml_has_no_template_braces() {
    // Helm would read `{{` in a description as a template action.
    assert!(!crd::crd_yaml().contains("{{"));
}
