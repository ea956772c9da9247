# `nix flake check`: the Rust checks share the workspace's dependency build;
# the deployment checks render every Kustomize overlay and test the alert
# rules; the NixOS VM test runs the sale scenario (Linux only).
{ pkgs
, craneLib
, advisory-db
, root
, rust
, services
, vmTest
}:
let
  inherit (pkgs) lib;
  inherit (rust) commonArgs cargoArtifacts;

  # What the deployment checks read: the Kubernetes bundle, the monitoring
  # rules and the migrations a Job may ship.
  deploySrc = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions (map (dir: lib.fileset.maybeMissing (root + "/${dir}"))
      [ "k8s" "kustomize" "monitoring" "migrations" ]);
  };

  nixSrc = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") root;
  };

  python = pkgs.python3.withPackages (ps: [ ps.pyyaml ]);

  renderOverlay = overlay: pkgs.runCommand "manifests-${overlay}"
    { nativeBuildInputs = [ pkgs.kustomize python ]; }
    ''
      mkdir -p $out
      kustomize build ${deploySrc}/kustomize/overlays/${overlay} > $out/${overlay}.yaml
      python3 ${./check-manifests.py} $out/${overlay}.yaml ${lib.escapeShellArgs (builtins.attrNames services)}
    '';
in
lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux { vm-test = vmTest; } // {
  build = rust.workspace;

  fmt = craneLib.cargoFmt { inherit (commonArgs) src pname version; };

  clippy = craneLib.cargoClippy (commonArgs // {
    inherit cargoArtifacts;
    cargoClippyExtraArgs = "--all-targets -- --deny warnings";
  });

  # Unit tests only: the integration tests need real Redis, Kafka and MySQL,
  # which the VM test provides.
  nextest = craneLib.cargoNextest (commonArgs // {
    inherit cargoArtifacts;
    cargoNextestExtraArgs = "--lib --bins --no-tests=warn";
  });

  audit = craneLib.cargoAudit {
    inherit (commonArgs) src pname version;
    inherit advisory-db;
  };

  manifests-dev = renderOverlay "dev";
  manifests-staging = renderOverlay "staging";
  manifests-production = renderOverlay "production";

  # The alert rules as a plain rule file, the rules of every PrometheusRule
  # object the bundle deploys, and the rule unit tests (*test*.yaml).
  promtool = pkgs.runCommand "promtool-rules"
    { nativeBuildInputs = [ pkgs.prometheus.cli pkgs.yq-go ]; }
    ''
      monitoring=${deploySrc}/monitoring
      promtool check rules $monitoring/prometheus/rules.yaml
      # Store paths hold no spaces, so plain word splitting is safe here.
      for object in $(grep -rl --include='*.yaml' '^kind: PrometheusRule' $monitoring || true); do
        yq 'select(.kind == "PrometheusRule") | .spec' "$object" > spec.yaml
        promtool check rules spec.yaml
      done
      for tests in $(find $monitoring -name '*test*.yaml'); do
        (cd "$(dirname "$tests")" && promtool test rules "$(basename "$tests")")
      done
      touch $out
    '';

  nix-lint = pkgs.runCommand "nix-lint"
    { nativeBuildInputs = [ pkgs.nixpkgs-fmt pkgs.deadnix ]; }
    ''
      nixpkgs-fmt --check ${nixSrc}
      deadnix --fail ${nixSrc}
      touch $out
    '';
}
