# Evaluates the flake's real wiring (flake.nix and nix/) for x86_64-linux
# without nixpkgs: nixpkgs, crane and flake-utils are replaced by stand-ins
# whose builders return their arguments, so the result shows what each
# package, image, check and app is made of. Nothing is built.
#
#   nix-instantiate --eval --strict --json tests/flake/eval.nix --argstr root /path/to/repo
#
# Only what the summary below reads is evaluated (Nix is lazy), so the
# stand-ins cover just the functions that evaluation reaches; a missing one
# shows up as "attribute ... missing" and belongs here.
{ root }:
let
  repo = /. + root;
  system = "x86_64-linux";

  # A derivation stand-in: its arguments plus a name and a fake store path.
  drv = name: args: args // {
    inherit name;
    type = "derivation";
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  package = name: drv name { pname = name; };

  lib = rec {
    optionalAttrs = cond: set: if cond then set else { };
    optionalString = cond: str: if cond then str else "";
    optionals = cond: list: if cond then list else [ ];
    genAttrs = names: f: builtins.listToAttrs (map (n: nameValuePair n (f n)) names);
    nameValuePair = name: value: { inherit name value; };
    mapAttrs' = f: set: builtins.listToAttrs (mapAttrsToList f set);
    mapAttrsToList = f: set: map (n: f n set.${n}) (builtins.attrNames set);
    concatStringsSep = builtins.concatStringsSep;
    concatMapStrings = f: list: builtins.concatStringsSep "" (map f list);
    inherit (builtins) filter any mapAttrs;
    escapeShellArgs = builtins.concatStringsSep " ";
    recursiveUpdate = lhs: rhs: lhs // builtins.mapAttrs
      (n: v:
        if builtins.isAttrs v && builtins.isAttrs (lhs.${n} or null)
        then recursiveUpdate lhs.${n} v
        else v)
      rhs;
    getExe = x: "${x.outPath}/bin/${x.meta.mainProgram}";
    findFirst = pred: default: list:
      let found = builtins.filter pred list;
      in if found == [ ] then default else builtins.head found;
    last = list: builtins.elemAt list (builtins.length list - 1);
    # Enough for the one-character separators the flake splits on.
    splitString = sep: str: builtins.filter builtins.isString (builtins.split "[${sep}]" str);
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    # File sets become data: which paths are added, and which extensions a
    # filter keeps out of a sample.
    fileset = {
      toSource = { root, fileset }: { root = toString root; inherit fileset; };
      unions = list: { unions = list; };
      maybeMissing = path: { maybeMissing = toString path; };
      fileFilter = keep: _: {
        keeps = builtins.filter
          (ext: keep { name = "sample.${ext}"; type = "regular"; hasExt = e: e == ext; })
          [ "rs" "toml" "lua" "sql" "snap" "nix" "md" "yaml" ];
      };
    };
  };

  pkgs = {
    inherit lib;
    stdenv.hostPlatform = { isLinux = true; isDarwin = false; };
    runCommand = name: env: script: drv name (env // { inherit script; });
    writeText = name: text: drv name { inherit text; };
    writeShellApplication = args: drv args.name (args // { meta.mainProgram = args.name; });
    symlinkJoin = args: drv args.name args;
    linkFarm = name: entries: drv name { inherit entries; };
    dockerTools = {
      buildLayeredImage = args: drv "${baseNameOf args.name}.tar.gz" args // { imageName = args.name; };
      caCertificates = package "ca-certificates";
    };
    fakeNss = package "fake-nss" // { override = args: package "fake-nss" // args; };
    testers.runNixOSTest = args: drv "vm-test-${args.name}" args;
    cacert = package "cacert";
    zlib = package "zlib";
    libiconv = package "libiconv";
    pkg-config = package "pkg-config";
    cmake = package "cmake";
    # Older than any rdkafka-sys the lock may hold, so the rebuild path runs.
    rdkafka = package "rdkafka" // {
      version = "2.0.0";
      overrideAttrs = f:
        let changed = f { };
        in package "rdkafka-${changed.version}" // changed;
    };
    # pname as nixpkgs' package files set it: "mysql" for every Oracle MySQL
    # series, "mariadb-server" for MariaDB; one version of each series.
    mysql84 = drv "mysql-8.4.3" { pname = "mysql"; version = "8.4.3"; };
    mysql80 = drv "mysql-8.0.40" { pname = "mysql"; version = "8.0.40"; };
    mariadb = drv "mariadb-server-11.4.5" { pname = "mariadb-server"; version = "11.4.5"; };
    apacheKafka = package "apache-kafka";
  };

  craneLib = {
    crateNameFromCargoToml = { cargoToml }:
      let manifest = builtins.fromTOML (builtins.readFile cargoToml);
      in { version = manifest.package.version or manifest.workspace.package.version; };
    fileset.commonCargoSources = path: { cargoSources = toString path; };
    buildDepsOnly = args: drv "${args.pname}-deps" args;
    buildPackage = args: drv args.pname args;
    cargoFmt = args: drv "${args.pname}-fmt" args;
    cargoClippy = args: drv "${args.pname}-clippy" args;
    cargoNextest = args: drv "${args.pname}-nextest" args;
    cargoAudit = args: drv "${args.pname}-audit" args;
    devShell = args: drv "dev-shell" args;
    downloadCargoPackage = args: drv "cargo-package-${args.name}-${args.version}" args;
  };

  self = {
    rev = "0123456789abcdef0123456789abcdef01234567";
    lastModifiedDate = "20250102030405";
  };
  flake = import (repo + "/flake.nix");
  outputs = flake.outputs {
    inherit self;
    nixpkgs.legacyPackages.${system} = pkgs;
    crane.mkLib = _: craneLib;
    flake-utils.lib.eachDefaultSystem = f:
      builtins.mapAttrs (_: value: { ${system} = value; }) (f system);
    advisory-db = "/nix/store/00000000000000000000000000000000-advisory-db";
  };

  packages = outputs.packages.${system};
  checks = outputs.checks.${system};
  services = import (repo + "/nix/services.nix");
  vm = checks.vm-test;
  rdkafka = lib.findFirst (p: builtins.substring 0 7 p.name == "rdkafka") null packages.workspace.buildInputs;
  machine = vm.nodes.machine;
in
{
  # The revision and commit time the stand-in `self` gave the flake.
  inherit self;

  inputs = builtins.mapAttrs (_: input: { url = input.url; flake = input.flake or true; }) flake.inputs;

  packages = builtins.attrNames packages;
  checks = builtins.attrNames checks;
  apps = builtins.attrNames outputs.apps.${system};
  devShells = builtins.attrNames outputs.devShells.${system};

  inherit services;

  binaries = builtins.mapAttrs (_: p: { mainProgram = p.meta.mainProgram; path = p.outPath; inherit (p) script; })
    (builtins.intersectAttrs
      (lib.genAttrs (builtins.attrNames services ++ [ "flash-sale-scenario" "xtask" ]) (_: null))
      packages);

  images = builtins.mapAttrs
    (_: image: {
      inherit (image) imageName tag created;
      inherit (image.config) User Entrypoint Labels;
      ports = builtins.attrNames image.config.ExposedPorts;
      contents = map (c: c.name) image.contents;
    })
    (lib.genAttrs (map (name: "${name}-image") (builtins.attrNames services)) (name: packages.${name}));

  # File names in `nix build .#all-images`, which cicd/push-images.sh reads.
  allImages = map (entry: entry.name) packages.all-images.entries;

  cargo = {
    inherit (packages.workspace) cargoExtraArgs doCheck;
    inherit (packages.workspace.env) SQLX_OFFLINE;
    source = packages.workspace.src;
    buildInputs = map (p: p.name) packages.workspace.buildInputs;
    rdkafka = { inherit (rdkafka) version src; };
    nativeBuildInputs = map (p: p.name) packages.workspace.nativeBuildInputs;
    # Which dependency build each cargo derivation starts from.
    artifacts = {
      workspace = packages.workspace.cargoArtifacts.name;
      clippy = checks.clippy.cargoArtifacts.name;
      nextest = checks.nextest.cargoArtifacts.name;
    };
    clippy = checks.clippy.cargoClippyExtraArgs;
    nextest = checks.nextest.cargoNextestExtraArgs;
    auditDatabase = checks.audit.advisory-db;
  };

  vmTest = {
    inherit (vm) testScript;
    scenario = packages.flash-sale-scenario.outPath;
    units = builtins.mapAttrs
      (_: unit: {
        ExecStart = unit.serviceConfig.ExecStart or null;
        ExecStartPre = unit.serviceConfig.ExecStartPre or null;
        after = unit.after or [ ];
      })
      machine.systemd.services;
    kafkaRoles = machine.services.apache-kafka.settings."process.roles";
    kafkaFormatsLogDirs = machine.services.apache-kafka.formatLogDirs;
    redis = machine.services.redis.servers."".enable;
    mysql = {
      inherit (machine.services.mysql.package) pname version;
      inherit (machine.services.mysql) settings;
      initialScript = machine.services.mysql.initialScript.text;
    };
  };
}
