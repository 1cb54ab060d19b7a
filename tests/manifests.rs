//! The deployment files (k8s/, docker-compose.yml, skaffold.yaml, Dockerfile) checked offline by
//! `tests/k8s/check_manifests.py`: Kubernetes schema validation with the kubernetes-validate
//! package, then the env contract of the roles and the wiring between the manifests.
//!
//! The interpreter is `$K8S_VALIDATE_PYTHON` (`.ci/run` points it at a venv holding
//! kubernetes-validate and PyYAML), else `python3`. Without those modules the test is skipped,
//! except under CI (`CI` set), where it fails.

use std::io::Write;
use std::path::Path;
use std::process::Command;

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

#[test]
fn deployment_files_validate_and_keep_the_env_contract() {
    let python = std::env::var("K8S_VALIDATE_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    let has_modules = Command::new(&python)
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_modules {
        assert!(
            !under_ci(),
            "{python} lacks kubernetes-validate / PyYAML: .ci/run installs them in .ci/.venv \
             and sets K8S_VALIDATE_PYTHON"
        );
        // Straight to stderr, past the test harness' capture, so the skip is seen.
        let _ = writeln!(
            std::io::stderr(),
            "skipped: kubernetes-validate not installed (.ci/run installs it)"
        );
        return;
    }

    let out = Command::new(&python)
        .arg(root.join("tests/k8s/check_manifests.py"))
        .current_dir(root)
        .output()
        .expect("run tests/k8s/check_manifests.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_manifests.py failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.starts_with("ok:"),
        "unexpected output:\n{stdout}{stderr}"
    );
    println!("{}", stdout.trim_end());
}
