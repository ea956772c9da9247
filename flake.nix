{
  description = "Flash-sale system: Rust services, OCI images, Kubernetes overlays and a NixOS VM test";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    crane.url = "github:ipetkov/crane";
    flake-utils.url = "github:numtide/flake-utils";
    advisory-db = {
      url = "github:rustsec/advisory-db";
      flake = false;
    };
  };

  # Only wiring here; what is built, checked and run lives in nix/.
  outputs = { self, nixpkgs, crane, flake-utils, advisory-db }:
    flake-utils.lib.eachDefaultSystem (system:
      let
        pkgs = nixpkgs.legacyPackages.${system};
      in
      import ./nix {
        inherit pkgs advisory-db;
        craneLib = crane.mkLib pkgs;
        root = ./.;
        revision = self.rev or "dirty";
        inherit (self) lastModifiedDate;
      });
}
