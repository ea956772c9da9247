# The Rust workspace built with crane.
#
# One dependency build (`cargoArtifacts`) for the whole workspace is shared by
# the workspace build and by every cargo check (clippy, nextest). The workspace
# is built once with the same cargo arguments as the dependency build, so cargo
# never rebuilds a dependency with other features; each binary package is a
# copy of one binary out of that build, so an image only holds its own service.
{ pkgs
, craneLib
, root
, services
}:
let
  inherit (pkgs) lib;

  # Cargo sources plus everything the crates embed at compile time: the sqlx
  # migrations and offline query data, the Redis Lua scripts, SQL files and
  # insta snapshots.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (craneLib.fileset.commonCargoSources root)
      (lib.fileset.maybeMissing (root + "/migrations"))
      (lib.fileset.maybeMissing (root + "/.sqlx"))
      (lib.fileset.fileFilter (file: lib.any file.hasExt [ "lua" "sql" "snap" ]) root)
    ];
  };

  # Every service crate that declares the `dynamic-linking` feature gets it, so
  # rdkafka links nixpkgs' librdkafka instead of building the bundled copy
  # (whose cmake build fails on read-only sources).
  declaresDynamicLinking = name:
    let
      manifest = builtins.fromTOML (builtins.readFile (root + "/services/${name}/Cargo.toml"));
    in
    (manifest.features or { }) ? dynamic-linking;
  features = map (name: "${name}/dynamic-linking")
    (lib.filter declaresDynamicLinking (builtins.attrNames services));

  rdkafka = import ./rdkafka.nix {
    inherit lib craneLib;
    inherit (pkgs) rdkafka;
    cargoLock = root + "/Cargo.lock";
  };

  commonArgs = {
    inherit src;
    pname = "flash-sale";
    inherit (craneLib.crateNameFromCargoToml { cargoToml = root + "/Cargo.toml"; }) version;
    strictDeps = true;

    cargoExtraArgs = "--locked --workspace"
      + lib.optionalString (features != [ ]) " --features ${lib.concatStringsSep "," features}";

    nativeBuildInputs = [ pkgs.pkg-config pkgs.cmake ];
    buildInputs = [ rdkafka pkgs.zlib ]
      ++ lib.optionals pkgs.stdenv.hostPlatform.isDarwin [ pkgs.libiconv ];

    env = {
      # sqlx checks its queries against .sqlx/ instead of a live database.
      SQLX_OFFLINE = "true";
      # A snapshot that differs fails the test instead of writing a .snap.new.
      INSTA_UPDATE = "no";
    };
  };

  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  workspace = craneLib.buildPackage (commonArgs // {
    inherit cargoArtifacts;
    # The tests run once, in the nextest check.
    doCheck = false;
  });

  # One binary out of the workspace build, on its own.
  binary = name: pkgs.runCommand name { meta.mainProgram = name; } ''
    install -Dm755 ${workspace}/bin/${name} $out/bin/${name}
  '';
in
{
  inherit src commonArgs cargoArtifacts workspace;

  # The three services, the sale scenario (cargo package flash-sale-tests, the
  # code the local integration suite runs) and the project's task runner.
  binaries = lib.genAttrs
    (builtins.attrNames services ++ [ "flash-sale-scenario" "xtask" ])
    binary;
}
