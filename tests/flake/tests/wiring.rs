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

/// The major.minor series of a version or image tag: `8.4.2` -> `8.4`.
fn series(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// The tags the Kubernetes bundle gives the `mysql` image: every `images:` entry named `mysql`
/// in a kustomization under k8s/ or kustomize/.
fn cluster_mysql_tags() -> Vec<String> {
    let mut tags = Vec::new();
    for dir in ["k8s", "kustomize"] {
        for file in files_ending_with(dir, &["kustomization.yaml"]) {
            let text = std::fs::read_to_string(&file).expect("readable kustomization");
            let doc: serde_yaml::Value = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", file.display()));
            for entry in doc["images"].as_sequence().into_iter().flatten() {
                if entry["name"].as_str() == Some("mysql")
                    && let Some(tag) = entry["newTag"].as_str()
                {
                    tags.push(tag.to_owned());
                }
            }
        }
    }
    tags
}

#[test]
fn vm_test_runs_the_clusters_mysql_8_4() {
    let flake = flake();
    let mysql = &flake["vmTest"]["mysql"];

    // nixpkgs names Oracle MySQL `mysql` in every series; MariaDB's server is `mariadb-server`.
    assert_eq!(
        str_of(&mysql["pname"]),
        "mysql",
        "the VM test's database is Oracle MySQL, not MariaDB"
    );
    let version = str_of(&mysql["version"]);
    assert_eq!(series(version), "8.4", "the VM test runs MySQL {version}");
    let tags = cluster_mysql_tags();
    assert!(
        !tags.is_empty(),
        "the Kubernetes bundle pins no `mysql` image tag"
    );
    for tag in &tags {
        assert_eq!(
            series(tag),
            series(version),
            "the cluster runs mysql:{tag}, the VM test MySQL {version}"
        );
    }

    // The server settings of the cluster's configuration that the services can observe.
    let cnf = section(&read("k8s/mysql/flash-sale.cnf"), "mysqld");
    let settings = &mysql["settings"]["mysqld"];
    for key in [
        "character-set-server",
        "collation-server",
        "innodb_flush_log_at_trx_commit",
        "sync_binlog",
    ] {
        let cluster = cnf
            .get(key)
            .unwrap_or_else(|| panic!("k8s/mysql/flash-sale.cnf sets no {key}"));
        let vm = match &settings[key] {
            Value::String(text) => text.clone(),
            Value::Null => {
                panic!("the VM test's MySQL does not set {key} (the cluster: {cluster})")
            }
            other => other.to_string(),
        };
        assert_eq!(&vm, cluster, "{key} differs from the cluster's");
    }

    // The database and user of the scenario's URL exist, with a password MySQL 8.4 accepts
    // without re-enabling mysql_native_password.
    let script = str_of(&flake["vmTest"]["testScript"]);
    let url = script
        .split_whitespace()
        .find_map(|word| word.strip_prefix("mysql://"))
        .expect("the scenario gets a mysql:// database URL");
    let (credentials, location) = url.split_once('@').expect("user:password@host/db");
    let (user, password) = credentials.split_once(':').expect("user:password");
    let (address, database) = location.split_once('/').expect("host:port/db");
    let host = address.split(':').next().unwrap_or(address);
    let init = str_of(&mysql["initialScript"]);
    for statement in [
        format!("CREATE DATABASE IF NOT EXISTS {database}"),
        format!("'{user}'@'{host}' IDENTIFIED BY '{password}'"),
        format!("ON {database}.* TO '{user}'@'{host}'"),
    ] {
        assert!(
            init.contains(&statement),
            "the MySQL init script lacks `{statement}`: {init}"
        );
    }
    assert!(
        !init.contains("mysql_native_password"),
        "MySQL 8.4 disables mysql_native_password by default: {init}"
    );
}

/// The owner, repository and commit of a `github:<owner>/<repo>/<rev>` flake URL whose rev is a
/// full commit hash; `None` for a branch, a tag, a short hash, a query or any other URL.
fn github_commit(url: &str) -> Option<(&str, &str, &str)> {
    let mut parts = url.strip_prefix("github:")?.split('/');
    let (owner, repo, rev) = (parts.next()?, parts.next()?, parts.next()?);
    let full_hash = rev.len() == 40 && rev.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (parts.next().is_none() && !owner.is_empty() && !repo.is_empty() && full_hash)
        .then_some((owner, repo, rev))
}

#[test]
fn only_full_commit_hashes_count_as_pins() {
    let rev = "26ef669cffa904b6f6832ab57b77892a37c1a671";
    assert_eq!(
        github_commit(&format!("github:NixOS/nixpkgs/{rev}")),
        Some(("NixOS", "nixpkgs", rev))
    );
    for floating in [
        "github:NixOS/nixpkgs/nixos-unstable",
        "github:ipetkov/crane",
        "github:ipetkov/crane/v0.23.4",
        "github:NixOS/nixpkgs/26ef669",
        "github:NixOS/nixpkgs?ref=nixos-25.11",
        "github:NixOS/nixpkgs/26EF669CFFA904B6F6832AB57B77892A37C1A671",
        "git+https://github.com/NixOS/nixpkgs?rev=26ef669cffa904b6f6832ab57b77892a37c1a671",
    ] {
        assert_eq!(github_commit(floating), None, "{floating}");
    }
}

#[test]
fn every_flake_input_is_pinned_to_a_commit_the_docs_account_for() {
    let flake = flake();
    let inputs = flake["inputs"].as_object().expect("the flake's inputs");
    assert!(!inputs.is_empty(), "the flake declares no inputs");
    let docs = read("docs/nix.md");
    for (name, input) in inputs {
        let url = str_of(&input["url"]);
        let (owner, repo, rev) = github_commit(url).unwrap_or_else(|| {
            panic!(
                "flake input `{name}` floats (`{url}`): pin it as github:<owner>/<repo>/<40-hex commit>"
            )
        });
        assert!(
            docs.contains(rev),
            "docs/nix.md does not say where {name}'s commit {owner}/{repo}@{rev} comes from"
        );
    }
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
