# The librdkafka the services link (cargo feature `dynamic-linking`).
#
# rdkafka-sys refuses a system librdkafka older than the one it bundles: its
# version `X.Y.Z+A.B.C` asks pkg-config for at least A.B.C. nixpkgs' `rdkafka`
# is used as it is when it is new enough; otherwise the same package is rebuilt
# from the librdkafka sources that ship inside the locked rdkafka-sys crate, so
# the flake keeps working whichever nixpkgs revision the lock file pins.
{ lib
, rdkafka
, craneLib
, cargoLock
}:
let
  lockedPackages = (builtins.fromTOML (builtins.readFile cargoLock)).package;
  rdkafkaSys = lib.findFirst (p: p.name == "rdkafka-sys") null lockedPackages;
  wanted = lib.last (lib.splitString "+" rdkafkaSys.version);
  crate = craneLib.downloadCargoPackage {
    inherit (rdkafkaSys) name version checksum source;
  };
in
if rdkafkaSys == null || lib.versionAtLeast rdkafka.version wanted then
  rdkafka
else
  rdkafka.overrideAttrs (_: {
    version = wanted;
    src = "${crate}/librdkafka";
  })
