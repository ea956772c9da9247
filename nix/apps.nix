# `nix run .#sale` (the main job: stack, services, load, report and invariant
# check) and `nix run .#promote` (a canary's verdict against its stable version,
# once its Rollout waits at its last, manual pause step, then promote or abort
# through Argo Rollouts; the pipeline runs it for staging and for production,
# with PROMETHEUS_URL set). Both run the project's own task runner, xtask, with
# the tools it drives on PATH.
#
# `FLASH_SALE_BIN_DIR` holds the service binaries the flake built, so xtask
# starts those instead of building the workspace with cargo.
{ pkgs
, services
, binaries
}:
let
  inherit (pkgs) lib;

  bin = pkgs.symlinkJoin {
    name = "flash-sale-bin";
    paths = map (name: binaries.${name}) (builtins.attrNames services ++ [ "flash-sale-scenario" ]);
  };

  xtaskApp = { name, command, tools, description }:
    let
      script = pkgs.writeShellApplication {
        name = "flash-sale-${name}";
        runtimeInputs = [ binaries.xtask ] ++ tools;
        text = ''
          export FLASH_SALE_BIN_DIR=${bin}/bin
          # The broker is not from nixpkgs: the pinned nixpkgs packages neither nisshi nor a
          # broker with its command line, so xtask takes nisshi from PATH or
          # FLASH_SALE_BROKER_PROGRAM (docs/nix.md).
          exec xtask ${command} "$@"
        '';
      };
    in
    {
      type = "app";
      program = lib.getExe script;
      meta = { inherit description; };
    };
in
{
  sale = xtaskApp {
    name = "sale";
    command = "sale";
    tools = [ bin pkgs.redis pkgs.mariadb pkgs.hey ];
    description = "Start the stack and the services, run a flash sale, print the report and the invariant check";
  };

  promote = xtaskApp {
    name = "promote";
    command = "canary promote";
    tools = [ pkgs.kubectl pkgs.argo-rollouts ];
    description = "Compare a canary waiting at its last pause with the stable version in Prometheus (PROMETHEUS_URL), then promote or abort it";
  };
}
