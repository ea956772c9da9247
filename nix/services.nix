# The deployable services, as fixed in docs/contracts.md: the attribute name is
# the cargo package, the binary and the last part of the image name
# (`flash-sale/<name>`); the ports are the seed's.
#
# Plain data with no function around it, so that tests/flake can read it with
# `nix-instantiate --eval` on machines without nixpkgs.
{
  gateway = {
    port = 8080;
    managementPort = 8081;
  };
  order-service = {
    port = 8082;
    managementPort = 8083;
  };
  inventory-service = {
    port = 8084;
    managementPort = 8085;
  };
}
