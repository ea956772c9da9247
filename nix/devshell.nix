# `nix develop`: the Rust toolchain (from crane: cargo, rustc, clippy,
# rustfmt), the build inputs of the workspace, and every tool the README and
# the tests call. `nix develop .#deploy`: only what the CI deploy jobs call.
{ pkgs
, craneLib
, rust
}:
{
  deploy = pkgs.mkShell {
    packages = with pkgs; [ kustomize kubectl argo-rollouts skopeo curl jq ];
  };

  default = craneLib.devShell {
    # pkg-config, cmake and the librdkafka the flake links come from here.
    inputsFrom = [ rust.workspace ];

    packages = with pkgs; [
      # Rust
      cargo-nextest
      cargo-audit
      rust-analyzer

      # The local stack and the load generator (its broker, nisshi, is not in
      # nixpkgs: `cargo install` it as the README says)
      redis
      mariadb
      hey

      # Monitoring and Kubernetes
      prometheus
      prometheus.cli
      kubectl
      kustomize
      argo-rollouts
      skopeo

      # Scripts, Nix files and manifests
      shellcheck
      nixpkgs-fmt
      deadnix
      jq
      curl
      (python3.withPackages (ps: [ ps.pyyaml ]))
    ];

    SQLX_OFFLINE = "true";
  };
}

