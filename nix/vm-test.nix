# The integration test in a NixOS VM: Redis, Apache Kafka in KRaft mode,
# MySQL 8.4 (the version the Kubernetes bundle runs) and the three services as
# systemd units, then the sale scenario that the local integration suite runs
# (the `flash-sale-scenario` binary of cargo package flash-sale-tests) drives a
# sale through the gateway and checks the invariants of docs/design.md,
# exiting non-zero on a violation.
#
# Redpanda is what the Kubernetes bundle runs, but nixpkgs removed its Redpanda
# server package in 2024 (broken since 2023; only the `rpk` client is left,
# docs/nix.md); Apache Kafka speaks the same protocol to librdkafka.
{ pkgs
, services
, binaries
}:
let
  inherit (pkgs) lib;

  adminToken = "vm-test-admin-token";
  databaseUrl = "mysql://flashsale:flashsale@127.0.0.1:3306/flash_sale";
  redisUrl = "redis://127.0.0.1:6379";
  brokers = "127.0.0.1:9092";
  topic = "flash-sale-order-topic";
  kafka = pkgs.apacheKafka;
  # Oracle MySQL 8.4 LTS, as the cluster's `mysql` image (k8s/kustomization.yaml).
  mysql = pkgs.mysql84;

  # Configuration every service reads (docs/contracts.md).
  environment = {
    FLASH_SALE_REDIS__URL = redisUrl;
    FLASH_SALE_DATABASE__URL = databaseUrl;
    FLASH_SALE_KAFKA__BROKERS = brokers;
    FLASH_SALE_KAFKA__TOPIC = topic;
    FLASH_SALE_INVENTORY__ADMIN_TOKEN = adminToken;
    RUST_LOG = "info";
  };

  infrastructure = [ "redis.service" "mysql.service" "flash-sale-topic.service" ];

  serviceUnit = name: extra: lib.recursiveUpdate
    {
      description = "flash-sale ${name}";
      wantedBy = [ "multi-user.target" ];
      after = infrastructure;
      requires = infrastructure;
      # Keep retrying while a dependency is still warming up.
      startLimitIntervalSec = 0;
      inherit environment;
      serviceConfig = {
        ExecStart = lib.getExe binaries.${name};
        DynamicUser = true;
        Restart = "on-failure";
        RestartSec = 2;
      };
    }
    extra;

  scenario = lib.concatStringsSep " " [
    (lib.getExe binaries.flash-sale-scenario)
    "--gateway http://127.0.0.1:${toString services.gateway.port}"
    "--inventory http://127.0.0.1:${toString services.inventory-service.port}"
    "--admin-token ${adminToken}"
    "--database-url ${databaseUrl}"
    "--redis-url ${redisUrl}"
    "--stock 2000"
    "--requests 20000"
  ];
in
pkgs.testers.runNixOSTest {
  name = "flash-sale";

  nodes.machine = {
    virtualisation = {
      cores = 2;
      memorySize = 4096;
      diskSize = 4096;
    };

    environment.systemPackages = [ pkgs.curl ];

    services.redis.servers."" = {
      enable = true;
      bind = "127.0.0.1";
      port = 6379;
      # The seed's persistence: append-only file, fsync every second, no RDB.
      save = [ ];
      appendOnly = true;
      appendFsync = "everysec";
    };

    services.mysql = {
      enable = true;
      package = mysql;
      # What k8s/mysql/flash-sale.cnf sets that the services can observe;
      # sizes fit the VM.
      settings.mysqld = {
        bind-address = "127.0.0.1";
        port = 3306;
        max_connections = 500;
        character-set-server = "utf8mb4";
        collation-server = "utf8mb4_unicode_ci";
        innodb_flush_log_at_trx_commit = 1;
        sync_binlog = 1;
      };
      # nixpkgs' module initialises Oracle MySQL with `mysqld
      # --initialize-insecure` and runs this once, as root over the socket.
      # The users get 8.4's default caching_sha2_password, as in the cluster
      # (8.4 disables mysql_native_password); sqlx answers it over plain TCP
      # with the server's RSA key.
      initialScript = pkgs.writeText "flash-sale-init.sql" ''
        CREATE DATABASE IF NOT EXISTS flash_sale CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
        CREATE USER IF NOT EXISTS 'flashsale'@'localhost' IDENTIFIED BY 'flashsale';
        CREATE USER IF NOT EXISTS 'flashsale'@'127.0.0.1' IDENTIFIED BY 'flashsale';
        GRANT ALL PRIVILEGES ON flash_sale.* TO 'flashsale'@'localhost';
        GRANT ALL PRIVILEGES ON flash_sale.* TO 'flashsale'@'127.0.0.1';
      '';
    };

    # One broker that is also its own KRaft controller.
    services.apache-kafka = {
      enable = true;
      package = kafka;
      clusterId = "uW2vL7iEQXap2PuJ2sRhxw";
      formatLogDirs = true;
      jvmOptions = [ "-Xms512m" "-Xmx512m" ];
      settings = {
        "node.id" = 1;
        "process.roles" = [ "broker" "controller" ];
        "listeners" = [ "PLAINTEXT://127.0.0.1:9092" "CONTROLLER://127.0.0.1:9093" ];
        "advertised.listeners" = [ "PLAINTEXT://127.0.0.1:9092" ];
        "listener.security.protocol.map" = [ "PLAINTEXT:PLAINTEXT" "CONTROLLER:PLAINTEXT" ];
        "controller.listener.names" = [ "CONTROLLER" ];
        "controller.quorum.voters" = [ "1@127.0.0.1:9093" ];
        "log.dirs" = [ "/var/lib/apache-kafka" ];
        "offsets.topic.replication.factor" = 1;
        "transaction.state.log.replication.factor" = 1;
        "transaction.state.log.min.isr" = 1;
        "auto.create.topics.enable" = false;
      };
    };

    systemd.services = {
      # The order topic, created once the broker answers.
      flash-sale-topic = {
        description = "Create the flash-sale order topic";
        wantedBy = [ "multi-user.target" ];
        after = [ "apache-kafka.service" ];
        requires = [ "apache-kafka.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          for _ in $(seq 90); do
            if ${kafka}/bin/kafka-topics.sh --bootstrap-server ${brokers} --create --if-not-exists \
                --topic ${topic} --partitions 3 --replication-factor 1; then
              exit 0
            fi
            sleep 2
          done
          exit 1
        '';
      };

      # Migrations first, as the Kubernetes migration Job does.
      inventory-service = serviceUnit "inventory-service" {
        serviceConfig.ExecStartPre = "${lib.getExe binaries.inventory-service} migrate";
      };
      order-service = serviceUnit "order-service" {
        after = infrastructure ++ [ "inventory-service.service" ];
      };
      gateway = serviceUnit "gateway" {
        after = infrastructure ++ [ "order-service.service" "inventory-service.service" ];
      };
    };
  };

  testScript = ''
    start_all()

    for unit in ["redis.service", "mysql.service", "apache-kafka.service", "flash-sale-topic.service"]:
        machine.wait_for_unit(unit)

    ${lib.concatMapStrings (name: ''
      machine.wait_for_unit("${name}.service")
      machine.wait_until_succeeds(
          "curl -fsS http://127.0.0.1:${toString services.${name}.managementPort}/health/ready",
          timeout=300,
      )
    '') (builtins.attrNames services)}

    # The same scenario as the local integration suite; it exits non-zero when
    # an invariant of docs/design.md does not hold.
    print(machine.succeed("timeout 1200 ${scenario} 2>&1"))

    # A second look at what MySQL holds, independent of the scenario's code
    # (root over the socket, passwordless after --initialize-insecure):
    # no activity sold more than its stock, no user holds two orders of one.
    oversold = machine.succeed(
        "mysql -N -e 'SELECT activity_id FROM flash_sale.orders"
        " GROUP BY activity_id HAVING SUM(quantity) > 2000'"
    )
    assert oversold.strip() == "", f"oversold activities: {oversold}"
    duplicates = machine.succeed(
        "mysql -N -e 'SELECT activity_id, user_id FROM flash_sale.orders"
        " GROUP BY activity_id, user_id HAVING COUNT(*) > 1'"
    )
    assert duplicates.strip() == "", f"duplicate orders: {duplicates}"

    # Every service is still up after the sale.
    ${lib.concatMapStrings (name: ''
      machine.succeed("curl -fsS http://127.0.0.1:${toString services.${name}.managementPort}/health/live")
    '') (builtins.attrNames services)}
  '';
}
