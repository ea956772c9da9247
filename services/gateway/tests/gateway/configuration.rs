//! Settings: the seed's defaults, and the environment names the Kubernetes manifests use.

use flash_sale_common::configuration::{self, CONFIG_FILE_ENV};
use gateway::Settings;
use gateway::configuration::JwtAlgorithm;

#[test]
fn defaults_are_the_seeds_ports_and_upstreams_and_the_safe_choices() {
    let s = Settings::default();
    assert_eq!((s.server.port, s.management.port), (8080, 8081));
    assert_eq!(s.upstreams.order_service, "http://127.0.0.1:8082");
    assert_eq!(s.upstreams.inventory_service, "http://127.0.0.1:8084");
    assert!(
        !s.auth.trust_body_user_id,
        "development mode is off by default"
    );
    assert!(s.routes.flash_sale.authenticate && !s.routes.inventory.authenticate);
    assert!(
        s.cluster.bucket_response_timeout_ms <= 100 && s.cluster.bucket_acquire_timeout_ms <= 10,
        "a slow Redis costs a bucket call little before the fallback"
    );
    assert!(
        s.redis.response_timeout_ms >= 10 * s.cluster.bucket_response_timeout_ms,
        "the waiting room, which has no fallback, waits longer for Redis than the bucket"
    );
}

#[test]
// figment's Jail closure must return figment's (large) error type.
#[allow(clippy::result_large_err)]
fn environment_variables_and_the_file_reach_every_level() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("gateway.toml", "[routes.flash_sale]\ntimeout_ms = 2500\n")?;
        jail.set_env(CONFIG_FILE_ENV, "gateway.toml");
        jail.set_env(
            "FLASH_SALE_UPSTREAMS__ORDER_SERVICE",
            "http://order-service:8082",
        );
        jail.set_env(
            "FLASH_SALE_UPSTREAMS__INVENTORY_SERVICE",
            "http://inventory-service:8084",
        );
        jail.set_env("FLASH_SALE_AUTH__ALGORITHM", "RS256");
        jail.set_env(
            "FLASH_SALE_AUTH__HS256_SECRET",
            "super-secret-value-that-must-not-print",
        );
        jail.set_env("FLASH_SALE_AUTH__TRUST_BODY_USER_ID", "true");
        jail.set_env("FLASH_SALE_RULES__FILE", "/etc/gateway/rules.toml");
        jail.set_env("FLASH_SALE_PROXY__TRUSTED_PROXY_HOPS", "1");
        let s = configuration::load(Settings::default()).map_err(|e| e.to_string())?;
        assert_eq!(s.upstreams.order_service, "http://order-service:8082");
        assert_eq!(
            s.upstreams.inventory_service,
            "http://inventory-service:8084"
        );
        assert_eq!(s.auth.algorithm, JwtAlgorithm::RS256);
        assert!(s.auth.trust_body_user_id);
        assert_eq!(s.rules.file.as_deref(), Some("/etc/gateway/rules.toml"));
        assert_eq!(s.proxy.trusted_proxy_hops, 1);
        assert_eq!(s.routes.flash_sale.timeout_ms, 2500);
        assert_eq!(
            s.routes.inventory.timeout_ms, 10_000,
            "untouched defaults stay"
        );
        let printed = format!("{s:?}");
        assert!(!printed.contains("super-secret"), "{printed}");
        Ok(())
    });
}

#[test]
fn a_gateway_without_a_token_key_refuses_to_start_unless_in_development_mode() {
    let mut s = Settings::default();
    let error = gateway::state::AppState::build(&s).unwrap_err().to_string();
    assert!(error.contains("auth.hs256_secret"), "{error}");
    s.auth.hs256_secret = flash_sale_common::configuration::Secret::new("short");
    let error = gateway::state::AppState::build(&s).unwrap_err().to_string();
    assert!(error.contains("at least 32 bytes"), "{error}");
    s.auth.algorithm = JwtAlgorithm::RS256;
    s.auth.rs256_public_key = "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----".into();
    assert!(gateway::state::AppState::build(&s).is_err());
    let mut s = Settings::default();
    s.auth.trust_body_user_id = true;
    gateway::state::AppState::build(&s).unwrap();
    s.upstreams.order_service = "https://order-service".into();
    let error = gateway::state::AppState::build(&s).unwrap_err().to_string();
    assert!(error.contains("only http://"), "{error}");
    s.upstreams.order_service = "http://order-service:8082/api".into();
    let error = gateway::state::AppState::build(&s).unwrap_err().to_string();
    assert!(error.contains("without a path"), "{error}");
    for (url, base) in [
        ("http://order-service", "http://order-service"),
        ("http://order-service:8082/", "http://order-service:8082"),
        ("10.0.0.7:8082", "http://10.0.0.7:8082"),
    ] {
        s.upstreams.order_service = url.into();
        let state = gateway::state::AppState::build(&s).unwrap();
        let order_service = gateway::resource::Downstream::OrderService;
        assert_eq!(state.upstream.base_url(order_service), base);
    }
}
