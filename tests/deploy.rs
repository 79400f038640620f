//! The fleet packaging in deploy/: the manifests parse with the expected kinds, the config
//! they ship is valid, and the systemd unit passes `systemd-analyze verify`.

use std::collections::BTreeSet;
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn kubernetes_manifests_parse_with_the_expected_kinds() {
    let dir = Path::new(ROOT).join("deploy/k8s");
    let mut kinds = BTreeSet::new();
    let mut config = None;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kind = doc["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no kind", path.display()))
            .to_string();
        assert!(doc["apiVersion"].is_string(), "{}", path.display());
        assert_eq!(doc["metadata"]["name"], "fulcrum");
        if kind == "Deployment" {
            let c = &doc["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
        }
        if kind == "ConfigMap" {
            config = doc["data"]["fulcrum.toml"].as_str().map(str::to_string);
        }
        kinds.insert(kind);
    }
    let want: BTreeSet<String> = [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds, want);
    let config = config.expect("the ConfigMap carries fulcrum.toml");
    fulcrum::config::Config::parse(&config, "configmap.yaml:fulcrum.toml")
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(check) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze not installed here: skipped");
        return;
    };
    assert!(check.status.success());
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/fulcrum.service"))
        .unwrap()
        .replace("/usr/local/bin/fulcrum", env!("CARGO_BIN_EXE_fulcrum"))
        .replace(
            "/etc/fulcrum/fulcrum.toml",
            &format!("{ROOT}/config/examples/minimal.toml"),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fulcrum.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
