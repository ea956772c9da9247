{
  description = "Flash-sale system: Rust services, OCI images, Kubernetes overlays and a NixOS VM test";

  # Every input is pinned to a commit, so the first `nix flake lock` records
  # exactly these revisions; docs/nix.md says where each one comes from.
  inputs = {
    # nixos-25.11 as of 2026-05-01 (mysql84, apacheKafka, the NixOS test driver).
    nixpkgs.url = "github:NixOS/nixpkgs/26ef669cffa904b6f6832ab57b77892a37c1a671";
    # v0.23.4, the last release that supports nixpkgs 25.11.
    crane.url = "github:ipetkov/crane/10e6e3cb966f7cfcc789fe5eee7a85f3188ce08b";
    # main as of 2024-11-13.
    flake-utils.url = "github:numtide/flake-utils/11707dc2f618dd54ca8739b309ec4fc024de578b";
    # main as of 2026-05-01.
    advisory-db = {
      url = "github:rustsec/advisory-db/20377f44edabca7c4a765ccdcd05935331b6191f";
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
