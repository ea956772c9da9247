//! The flake's wiring, evaluated without building anything (see `eval.nix`), checked against
//! the rest of the repository: the workspace, docs/contracts.md, the Kubernetes bundle, the
//! README and the CI pipeline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use flake_tests::{
    FlakeRef, describe, files_ending_with, flake, flake_refs, image_refs, names, our_image, read,
    repo_root, run,
};
use serde::Deserialize as _;
use serde_json::Value;

/// The keys of one `[section]` of a TOML text, and their raw values; section `""` holds the keys
/// before the first header.
fn section(manifest: &str, name: &str) -> BTreeMap<String, String> {
    let mut current = String::new();
    let mut keys = BTreeMap::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_matches(['[', ']']).to_owned();
        } else if current == name
            && let Some((key, value)) = line.split_once('=')
        {
            keys.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    keys
}

fn unquote(value: &str) -> String {
    value.trim_matches('"').to_owned()
}

/// The crates under services/ that build a binary: the deployable services (`common` is a
/// library), each with its manifest's text.
fn service_crates() -> BTreeMap<String, String> {
    let mut crates = BTreeMap::new();
    for manifest in files_ending_with("services", &["Cargo.toml"]) {
        let dir = manifest.parent().expect("a manifest lives in a directory");
        let text = std::fs::read_to_string(&manifest).expect("manifest is readable");
        let builds_binary = dir.join("src/main.rs").exists()
            || dir.join("src/bin").is_dir()
            || text.contains("[[bin]]");
        if builds_binary {
            let name = unquote(&section(&text, "package")["name"]);
            crates.insert(name, text);
        }
    }
    assert!(!crates.is_empty(), "no service crate under services/");
    crates
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
}

fn set_of(value: &Value) -> BTreeSet<String> {
    names(value).into_iter().collect()
}

#[test]
fn every_service_crate_has_a_package_and_an_image() {
    let flake = flake();
    let crates: BTreeSet<String> = service_crates().into_keys().collect();
    assert_eq!(
        set_of(&flake["services"]),
        crates,
        "nix/services.nix must list exactly the service crates under services/"
    );
    let packages = set_of(&flake["packages"]);
    let mut archives = Vec::new();
    for name in &crates {
        assert!(packages.contains(name), "no package `{name}` in the flake");
        assert_eq!(str_of(&flake["binaries"][name]["mainProgram"]), name);
        let image_attr = format!("{name}-image");
        assert!(
            packages.contains(&image_attr),
            "no package `{image_attr}` in the flake"
        );
        let image = &flake["images"][&image_attr];
        assert_eq!(str_of(&image["imageName"]), format!("flash-sale/{name}"));
        let entrypoint = format!("{}/bin/{name}", str_of(&flake["binaries"][name]["path"]));
        assert_eq!(
            str_of(&image["Entrypoint"][0]),
            entrypoint,
            "{image_attr} runs its service"
        );
        archives.push(format!("{name}.tar.gz"));
    }
    assert!(
        packages.contains("all-images"),
        "no aggregate `all-images` package"
    );
    assert_eq!(
        set_of(&flake["allImages"]),
        archives.into_iter().collect::<BTreeSet<_>>()
    );
}

#[test]
fn service_ports_match_the_contracts() {
    let flake = flake();
    let contracts = read("docs/contracts.md");
    let mut seen = BTreeSet::new();
    for row in contracts
        .lines()
        .filter(|l| l.starts_with('|') && l.contains("`flash-sale/"))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | package (dir) | binary | image | app port | mgmt port |
        let package = cells[1]
            .split('`')
            .nth(1)
            .expect("the package is in backticks");
        let binary = cells[2].trim_matches('`');
        assert_eq!(
            binary, package,
            "a service's binary is named after its package"
        );
        let service = &flake["services"][package];
        assert!(
            service.is_object(),
            "{package} is in docs/contracts.md but not in nix/services.nix"
        );
        let port: u64 = cells[4].parse().expect("app port");
        let management: u64 = cells[5].parse().expect("management port");
        assert_eq!(service["port"].as_u64(), Some(port), "{package} app port");
        assert_eq!(
            service["managementPort"].as_u64(),
            Some(management),
            "{package} management port"
        );
        let exposed = set_of(&flake["images"][format!("{package}-image")]["ports"]);
        assert_eq!(
            exposed,
            BTreeSet::from([format!("{port}/tcp"), format!("{management}/tcp")])
        );
        seen.insert(package.to_owned());
    }
    assert_eq!(
        seen,
        set_of(&flake["services"]),
        "every service has a row in docs/contracts.md"
    );
}

#[test]
fn images_are_reproducible_non_root_and_labelled() {
    let flake = flake();
    let rev = str_of(&flake["self"]["rev"]);
    let date = str_of(&flake["self"]["lastModifiedDate"]);
    let created = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &date[0..4],
        &date[4..6],
        &date[6..8],
        &date[8..10],
        &date[10..12],
        &date[12..14]
    );
    let images = flake["images"].as_object().expect("images");
    assert!(!images.is_empty());
    for (attr, image) in images {
        assert_eq!(
            str_of(&image["created"]),
            created,
            "{attr}: created from the flake's commit time"
        );
        assert_eq!(
            str_of(&image["Labels"]["org.opencontainers.image.revision"]),
            rev,
            "{attr}"
        );
        assert_eq!(
            str_of(&image["Labels"]["org.opencontainers.image.created"]),
            created,
            "{attr}"
        );
        let uid: u32 = str_of(&image["User"])
            .split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{attr}: User must be a numeric uid:gid"));
        assert_ne!(uid, 0, "{attr} must not run as root");
        assert!(
            set_of(&image["contents"]).contains("ca-certificates"),
            "{attr} carries CA certificates"
        );
    }
}

/// Pod specs (mappings with `containers`) anywhere in a document.
fn pod_specs<'a>(node: &'a serde_yaml::Value, found: &mut Vec<&'a serde_yaml::Mapping>) {
    match node {
        serde_yaml::Value::Mapping(map) => {
            if map.contains_key("containers") {
                found.push(map);
            }
            for value in map.values() {
                pod_specs(value, found);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter().for_each(|i| pod_specs(i, found)),
        _ => {}
    }
}

#[test]
fn manifests_run_our_images_as_the_user_the_images_declare() {
    let flake = flake();
    let image_uid: BTreeMap<String, u64> = flake["images"]
        .as_object()
        .expect("images")
        .values()
        .map(|image| {
            let uid = str_of(&image["User"]).split(':').next().unwrap_or_default();
            (
                str_of(&image["imageName"]).to_owned(),
                uid.parse().expect("numeric uid"),
            )
        })
        .collect();
    let mut checked = 0;
    for file in files_ending_with("k8s", &[".yaml", ".yml"]) {
        let text = std::fs::read_to_string(&file).expect("readable manifest");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document).expect("YAML");
            let mut pods = Vec::new();
            pod_specs(&value, &mut pods);
            for pod in pods {
                let pod_uid = pod
                    .get("securityContext")
                    .and_then(|c| c.get("runAsUser"))
                    .and_then(|u| u.as_u64());
                for container in pod["containers"].as_sequence().into_iter().flatten() {
                    let Some(image) = container["image"].as_str().and_then(our_image) else {
                        continue;
                    };
                    let uid = container
                        .get("securityContext")
                        .and_then(|c| c.get("runAsUser"))
                        .and_then(|u| u.as_u64())
                        .or(pod_uid);
                    if let Some(uid) = uid {
                        let wanted = image_uid[&format!("flash-sale/{image}")];
                        assert_eq!(
                            uid,
                            wanted,
                            "{}: flash-sale/{image} runs as {uid}",
                            file.display()
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no workload under k8s/ sets runAsUser for our images"
    );
}

#[test]
fn manifests_run_only_images_the_flake_builds() {
    let flake = flake();
    let built: BTreeSet<String> = flake["images"]
        .as_object()
        .expect("images")
        .values()
        .map(|image| str_of(&image["imageName"]).to_owned())
        .collect();
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for dir in ["k8s", "kustomize"] {
        assert!(repo_root().join(dir).is_dir(), "{dir}/ is missing");
        for file in files_ending_with(dir, &[".yaml", ".yml"]) {
            let text = std::fs::read_to_string(&file).expect("readable manifest");
            let mut refs = Vec::new();
            for document in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
                image_refs(&value, &mut refs);
            }
            for reference in refs {
                if let Some(service) = our_image(&reference) {
                    let relative = file.strip_prefix(repo_root()).unwrap_or(&file);
                    used.entry(format!("flash-sale/{service}"))
                        .or_default()
                        .push(relative.display().to_string());
                }
            }
        }
    }
    for (image, files) in &used {
        assert!(
            built.contains(image),
            "{image} (used in {files:?}) is not built by the flake"
        );
    }
    for image in &built {
        assert!(
            used.contains_key(image),
            "the flake builds {image} but no manifest runs it"
        );
    }
}

#[test]
fn apps_and_checks_named_in_the_readme_and_the_pipeline_exist() {
    let flake = flake();
    let packages = set_of(&flake["packages"]);
    let apps = set_of(&flake["apps"]);
    let checks = set_of(&flake["checks"]);
    let shells = set_of(&flake["devShells"]);
    for file in ["README.md", "cicd/.gitlab-ci.yml"] {
        assert!(repo_root().join(file).is_file(), "{file} is missing");
        for reference in flake_refs(&read(file)) {
            let found = match &reference {
                FlakeRef::Check(name) => checks.contains(name),
                FlakeRef::App(name) => apps.contains(name) || packages.contains(name),
                FlakeRef::Package(name) => packages.contains(name),
                FlakeRef::DevShell(name) => shells.contains(name) || packages.contains(name),
                FlakeRef::Any(name) => [&packages, &apps, &checks, &shells]
                    .iter()
                    .any(|s| s.contains(name)),
            };
            assert!(
                found,
                "{file} names {reference:?}, which the flake does not have"
            );
        }
    }
    let pipeline = read("cicd/.gitlab-ci.yml");
    assert!(
        pipeline.contains("nix flake check"),
        "the pipeline's test stage runs every check"
    );
}

#[test]
fn the_flake_has_every_check_the_issue_asks_for() {
    let flake = flake();
    let checks = set_of(&flake["checks"]);
    for check in [
        "fmt",
        "clippy",
        "nextest",
        "audit",
        "manifests-dev",
        "manifests-staging",
        "manifests-production",
        "promtool",
        "vm-test",
    ] {
        assert!(checks.contains(check), "no check `{check}`");
    }
    let cargo = &flake["cargo"];
    assert!(
        str_of(&cargo["clippy"]).contains("--deny warnings"),
        "clippy denies warnings"
    );
    assert!(
        str_of(&cargo["nextest"]).contains("--lib"),
        "nextest runs the unit tests"
    );
    assert!(
        str_of(&cargo["auditDatabase"]).ends_with("advisory-db"),
        "audit uses the advisory-db input"
    );
    assert_eq!(
        set_of(&flake["apps"]),
        BTreeSet::from(["promote".into(), "sale".into()])
    );
    assert!(set_of(&flake["devShells"]).contains("default"));

    let inputs = &flake["inputs"];
    for input in ["nixpkgs", "crane", "flake-utils", "advisory-db"] {
        assert!(
            inputs[input].is_object(),
            "flake input `{input}` is missing"
        );
    }
    assert_eq!(
        inputs["advisory-db"]["flake"],
        Value::Bool(false),
        "advisory-db is plain data"
    );
}

#[test]
fn one_dependency_build_links_nixpkgs_rdkafka_and_keeps_embedded_files() {
    let flake = flake();
    let cargo = &flake["cargo"];

    let artifacts = set_of(&cargo["artifacts"])
        .into_iter()
        .map(|k| str_of(&cargo["artifacts"][&k]).to_owned())
        .collect::<BTreeSet<_>>();
    assert_eq!(
        artifacts.len(),
        1,
        "the workspace, clippy and nextest share one dependency build"
    );

    let args = str_of(&cargo["cargoExtraArgs"]);
    assert!(
        args.contains("--locked") && args.contains("--workspace"),
        "{args}"
    );
    let mut linked = 0;
    for (name, manifest) in service_crates() {
        if section(&manifest, "features").contains_key("dynamic-linking") {
            assert!(
                args.contains(&format!("{name}/dynamic-linking")),
                "{name}: {args}"
            );
            linked += 1;
        }
    }
    assert!(
        args.contains("order-service/dynamic-linking"),
        "the buy path links rdkafka: {args}"
    );
    assert!(linked >= 1);
    assert_eq!(str_of(&cargo["SQLX_OFFLINE"]), "true");
    assert!(set_of(&cargo["nativeBuildInputs"]).contains("pkg-config"));

    // rdkafka-sys X.Y.Z+A.B.C needs librdkafka >= A.B.C; eval.nix offers an older one, so the
    // flake must rebuild it from the locked crate's sources.
    let lock = read("Cargo.lock");
    let bundled = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"rdkafka-sys\""))
        .and_then(|p| section(p, "").get("version").map(|v| unquote(v)))
        .expect("Cargo.lock holds rdkafka-sys");
    let wanted = bundled
        .split('+')
        .nth(1)
        .expect("rdkafka-sys version carries librdkafka's");
    assert_eq!(str_of(&cargo["rdkafka"]["version"]), wanted);
    assert!(
        str_of(&cargo["rdkafka"]["src"]).ends_with(&format!("rdkafka-sys-{bundled}/librdkafka"))
    );
    assert!(
        names(&cargo["buildInputs"])
            .iter()
            .any(|i| i.starts_with("rdkafka")),
        "the workspace links rdkafka"
    );

    // The source filter keeps what the crates embed at compile time.
    let source = cargo["source"]["fileset"].to_string();
    for kept in ["/migrations\"", "/.sqlx\""] {
        assert!(
            source.contains(kept),
            "the Rust source keeps {kept}: {source}"
        );
    }
    let keeps: BTreeSet<String> = cargo["source"]["fileset"]["unions"]
        .as_array()
        .expect("the Rust source is a union of file sets")
        .iter()
        .filter(|set| set.get("keeps").is_some())
        .flat_map(|set| names(&set["keeps"]))
        .collect();
    let embedded = files_ending_with(".", &[".lua", ".sql"]);
    assert!(!embedded.is_empty());
    for file in embedded {
        let ext = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        assert!(
            keeps.contains(ext),
            "{} would be missing from the Nix build",
            file.display()
        );
    }
}

#[test]
fn vm_test_runs_the_scenario_of_the_local_suite() {
    let flake = flake();
    let vm = &flake["vmTest"];
    let script = str_of(&vm["testScript"]);
    let scenario = format!("{}/bin/flash-sale-scenario", str_of(&vm["scenario"]));
    assert!(script.contains(&scenario), "the VM test runs {scenario}");
    let services = &flake["services"];
    for argument in [
        format!("--gateway http://127.0.0.1:{}", services["gateway"]["port"]),
        format!(
            "--inventory http://127.0.0.1:{}",
            services["inventory-service"]["port"]
        ),
        "--admin-token ".into(),
        "--database-url mysql://".into(),
        "--redis-url redis://".into(),
        "--stock 2000".into(),
        "--requests 20000".into(),
    ] {
        assert!(
            script.contains(&argument),
            "the scenario is called with `{argument}`"
        );
    }
    assert!(
        str_of(&flake["binaries"]["flash-sale-scenario"]["script"])
            .contains("/bin/flash-sale-scenario")
    );

    // The three services run as systemd units, inventory-service migrating first.
    let units = &vm["units"];
    for name in names(services) {
        let binary = format!("{}/bin/{name}", str_of(&flake["binaries"][&name]["path"]));
        assert_eq!(str_of(&units[&name]["ExecStart"]), binary, "unit {name}");
    }
    let migrate = format!(
        "{} migrate",
        str_of(&units["inventory-service"]["ExecStart"])
    );
    assert_eq!(str_of(&units["inventory-service"]["ExecStartPre"]), migrate);
    assert!(set_of(&units["order-service"]["after"]).contains("inventory-service.service"));
    assert_eq!(
        set_of(&vm["kafkaRoles"]),
        BTreeSet::from(["broker".into(), "controller".into()])
    );
    assert_eq!(
        vm["kafkaFormatsLogDirs"],
        Value::Bool(true),
        "KRaft log dirs are formatted"
    );
    assert_eq!(vm["redis"], Value::Bool(true));
    assert_eq!(str_of(&vm["mysql"]), "mariadb");

    // The binary is the local integration suite's: package flash-sale-tests, a workspace member,
    // whose tests share the scenario's code.
    assert!(
        read("Cargo.toml").contains("\"tests/integration\""),
        "tests/integration is a workspace member"
    );
    let manifest = read("tests/integration/Cargo.toml");
    assert_eq!(
        unquote(&section(&manifest, "package")["name"]),
        "flash-sale-tests"
    );
    let dir = repo_root().join("tests/integration");
    let bin = [
        "src/bin/flash-sale-scenario.rs",
        "src/bin/flash-sale-scenario/main.rs",
    ]
    .iter()
    .map(|p| dir.join(p))
    .find(|p| p.exists())
    .or_else(|| {
        manifest
            .split("[[bin]]")
            .skip(1)
            .find(|b| b.contains("\"flash-sale-scenario\""))
            .and_then(|b| section(b, "").get("path").map(|p| dir.join(unquote(p))))
    })
    .expect("tests/integration builds the flash-sale-scenario binary");
    let bin_source = std::fs::read_to_string(&bin).expect("the scenario's source is readable");
    let suite: Vec<String> = files_ending_with("tests/integration/tests", &[".rs"])
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("readable test"))
        .collect();
    assert!(
        !suite.is_empty(),
        "tests/integration/tests holds the local integration suite"
    );
    let runs_the_binary = suite
        .iter()
        .any(|t| t.contains("CARGO_BIN_EXE_flash-sale-scenario"));
    let shares_the_library = bin_source.contains("flash_sale_tests::")
        && suite.iter().any(|t| t.contains("flash_sale_tests::"));
    assert!(
        runs_the_binary || shares_the_library,
        "the local suite must run the same scenario code as the VM test ({})",
        bin.display()
    );
}

#[test]
fn pipeline_runs_the_seed_stages_on_nix() {
    let pipeline: serde_yaml::Value =
        serde_yaml::from_str(&read("cicd/.gitlab-ci.yml")).expect("the pipeline is YAML");
    let stages: Vec<&str> = pipeline["stages"]
        .as_sequence()
        .expect("stages")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(
        stages,
        [
            "build",
            "test",
            "security",
            "package",
            "deploy-staging",
            "smoke-test",
            "deploy-production",
            "promote"
        ]
    );
    let jobs: Vec<(&str, &serde_yaml::Value)> = pipeline
        .as_mapping()
        .expect("a mapping")
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?, v)))
        .filter(|(_, v)| v.get("stage").is_some())
        .collect();
    for stage in &stages {
        assert!(
            jobs.iter()
                .any(|(_, job)| job["stage"].as_str() == Some(stage)),
            "no job in stage {stage}"
        );
    }
    for (name, job) in &jobs {
        let text = serde_yaml::to_string(job).expect("serialisable");
        if job["stage"].as_str() == Some("deploy-production") {
            assert!(
                text.contains("when: manual"),
                "{name} waits for a manual approval"
            );
        }
        for script in text.split("bash ").skip(1) {
            let path = script.split_whitespace().next().unwrap_or_default();
            assert!(
                Path::new(&repo_root()).join(path).is_file(),
                "{name} runs {path}, which is missing"
            );
        }
    }
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let mut scripts = files_ending_with("cicd", &[".sh"]);
    scripts.push(repo_root().join("tests/flake/install-tools.sh"));
    let output = run("shellcheck", &scripts);
    assert!(output.status.success(), "{}", describe(&output));
}

#[test]
fn deployment_checks_read_files_that_exist() {
    for overlay in ["dev", "staging", "production"] {
        let path = format!("kustomize/overlays/{overlay}/kustomization.yaml");
        assert!(
            repo_root().join(&path).is_file(),
            "check manifests-{overlay} renders {path}, which is missing"
        );
    }
    let rules = "monitoring/prometheus/rules.yaml";
    assert!(
        repo_root().join(rules).is_file(),
        "check promtool reads {rules}, which is missing"
    );
}
