# One OCI image per service, `flash-sale/<service>`, the names the Kubernetes
# manifests run (docs/contracts.md), and `all-images` to build them together.
#
# The images are reproducible: layers carry the default fixed mtime and the
# creation time is the flake's last commit time, never "now".
{ pkgs
, services
, binaries
, version
, revision
, lastModifiedDate
}:
let
  inherit (pkgs) lib;

  # lastModifiedDate is YYYYMMDDHHMMSS; the image config wants ISO-8601.
  part = start: len: builtins.substring start len lastModifiedDate;
  created = "${part 0 4}-${part 4 2}-${part 6 2}T${part 8 2}:${part 10 2}:${part 12 2}Z";

  # An unprivileged user with a numeric id, so that Kubernetes' runAsNonRoot
  # can verify it without a passwd lookup.
  uid = 65532;
  user = "${toString uid}:${toString uid}";
  nss = pkgs.fakeNss.override {
    extraPasswdLines = [ "flashsale:x:${user}:flash-sale service:/var/empty:/bin/false" ];
    extraGroupLines = [ "flashsale:x:${toString uid}:" ];
  };

  mkImage = name: ports: pkgs.dockerTools.buildLayeredImage {
    name = "flash-sale/${name}";
    tag = builtins.substring 0 12 revision;
    inherit created;
    contents = [ pkgs.dockerTools.caCertificates nss ];
    # A world-writable /tmp for the rare library that wants one; the pods run
    # with a read-only root filesystem and mount an emptyDir there anyway.
    extraCommands = ''
      mkdir -m 1777 tmp
    '';
    config = {
      Entrypoint = [ (lib.getExe binaries.${name}) ];
      User = user;
      ExposedPorts = {
        "${toString ports.port}/tcp" = { };
        "${toString ports.managementPort}/tcp" = { };
      };
      Env = [ "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt" ];
      Labels = {
        "org.opencontainers.image.title" = "flash-sale/${name}";
        "org.opencontainers.image.revision" = revision;
        "org.opencontainers.image.created" = created;
        "org.opencontainers.image.version" = version;
        "org.opencontainers.image.licenses" = "MIT";
      };
    };
  };

  byService = lib.mapAttrs mkImage services;
in
lib.mapAttrs' (name: image: lib.nameValuePair "${name}-image" image) byService // {
  # <service>.tar.gz for each service: what cicd/push-images.sh pushes.
  all-images = pkgs.linkFarm "flash-sale-images"
    (lib.mapAttrsToList (name: image: { name = "${name}.tar.gz"; path = image; }) byService);
}
