//! Offline checks of the Kubernetes bundle (`k8s/`, `kustomize/`, `monitoring/`, `deploy.sh`).
//!
//! No cluster is reachable from where these tests run, so everything is proven on the rendered
//! manifests and with the real tools: `kubectl kustomize` renders each overlay,
//! `kubernetes-validate` checks every built-in object strictly against the Kubernetes 1.30
//! schemas, `tools/validate-crds.mjs` checks the custom resources strictly against the
//! `@kubernetes-models` schemas, `promtool` checks and unit-tests the rules, `promql-parser`
//! parses every query, `shellcheck` lints the scripts. A missing tool fails a test;
//! `tests/deploy/install-tools.sh` installs them all.
//!
//! Layout:
//! - [`tools`]: finding and running the external tools.
//! - [`manifest`]: rendering an overlay and reading the objects it holds.
//! - [`promql`]: the metric names a PromQL expression reads.
//! - [`contracts`]: the names `docs/contracts.md` fixes (env vars, metrics).
//!
//! The tests themselves live in `tests/`: `render.rs` (schemas and snapshots), `policy.rs`
//! (the workload checklist, network reachability, canary plans, references), `monitoring.rs`
//! (rules, dashboard, queries, canary analysis), `clusters.rs` (Redpanda's seed list against
//! the advertised addresses, Redis's masters, replicas and budget), `deploy_script.rs`
//! (`deploy.sh`) and `redis_bootstrap.rs` (the cluster bootstrap, readiness and failover
//! against real local Redis servers).

pub mod contracts;
pub mod manifest;
pub mod promql;
pub mod tools;

use std::path::{Path, PathBuf};

/// The repository root: this crate lives in `tests/deploy`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

/// A fresh, empty directory `<base>/deploy-tests/<name>` for one test's files; whatever an
/// earlier run left there is removed first. Tests call it through [`scratch_dir!`].
pub fn scratch_dir_under(base: &Path, name: &str) -> PathBuf {
    let dir = base.join("deploy-tests").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("old scratch directory removed");
    }
    std::fs::create_dir_all(&dir).expect("scratch directory created");
    dir
}

/// A fresh, empty directory for one test's files, under the target directory's `tmp/` (Cargo
/// sets `CARGO_TARGET_TMPDIR` when it compiles integration tests).
#[macro_export]
macro_rules! scratch_dir {
    ($name:expr) => {
        $crate::scratch_dir_under(::std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), $name)
    };
}
