# Everything the flake offers for one system, wired from the files beside this
# one. flake.nix only declares the inputs and calls this.
{ pkgs
, craneLib
, advisory-db
, root
, revision
, lastModifiedDate
}:
let
  inherit (pkgs) lib;

  services = import ./services.nix;

  rust = import ./packages.nix { inherit pkgs craneLib root services; };
  inherit (rust) binaries;

  images = import ./images.nix {
    inherit pkgs services binaries revision lastModifiedDate;
    inherit (rust.commonArgs) version;
  };

  vmTest = import ./vm-test.nix { inherit pkgs services binaries; };
in
{
  packages = binaries // {
    inherit (rust) workspace;
    default = rust.workspace;
  } // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux images;

  checks = import ./checks.nix {
    inherit pkgs craneLib advisory-db root rust services vmTest;
  };

  apps = import ./apps.nix { inherit pkgs services binaries; };

  devShells = import ./devshell.nix { inherit pkgs craneLib rust; };

  formatter = pkgs.nixpkgs-fmt;
}
