# `nix run .#sale` (the main job: stack, services, load, report and invariant
# check) and `nix run .#promote` (the production canary's verdict, then promote
# or abort through Argo Rollouts). Both run the project's own task runner,
# xtask, with the tools it drives on PATH.
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
          # nixpkgs has no nisshi; tansu takes the same command line (docs/nix.md).
          export FLASH_SALE_BROKER_PROGRAM=${lib.getExe' pkgs.tansu "tansu"}
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
    description = "Compare the production canary with the stable version in Prometheus, then promote or abort it";
  };
}
