//! The state every request shares; one `Arc`, so cloning it per request costs one increment.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use crate::admission::Signer;
use crate::configuration::Settings;
use crate::edge::PerAddress;
use crate::flow::Flow;
use crate::flow::RulesStore;
use crate::flow::cluster::ClusterLimiter;
use crate::identity::Identity;
use crate::resource::RouteId;
use crate::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub flow: Arc<Flow>,
    pub identity: Identity,
    /// Signs and checks queue tickets and purchase passes.
    pub admission: Signer,
    pub upstream: Upstream,
    pub settings: Arc<Settings>,
    /// Requests in flight per client behind trusted proxies (`connections.max_requests_per_client`).
    pub clients: Arc<PerAddress>,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Checks the settings and loads the rules; connects to nothing (Redis is connected in the
    /// background by the running application; until then the cluster limit uses its local share).
    pub fn build(settings: &Settings) -> anyhow::Result<Self> {
        let rules = RulesStore::load(settings.rules.file.as_deref().map(Path::new))?;
        let cluster = Arc::new(ClusterLimiter::new(&settings.cluster));
        Self::with_parts(settings, Arc::new(rules), cluster)
    }

    /// [`Self::build`] with given rules and cluster limiter (tests).
    pub fn with_parts(
        settings: &Settings,
        rules: Arc<RulesStore>,
        cluster: Arc<ClusterLimiter>,
    ) -> anyhow::Result<Self> {
        Ok(Self(Arc::new(Shared {
            flow: Arc::new(Flow::new(
                rules,
                cluster,
                settings.proxy.max_tracked_activities,
            )),
            identity: Identity::from_settings(&settings.auth)?,
            admission: Signer::from_settings(
                &settings.admission,
                settings.auth.leeway_secs,
                settings.auth.trust_body_user_id,
            )?,
            upstream: Upstream::new(&settings.upstreams, &settings.routes)?,
            settings: Arc::new(settings.clone()),
            // Without trusted proxies the client is the TCP peer, which the connection cap bounds.
            clients: PerAddress::new(if settings.proxy.trusted_proxy_hops > 0 {
                settings.connections.max_requests_per_client
            } else {
                0
            }),
        })))
    }

    pub fn authenticates(&self, route: RouteId) -> bool {
        match route {
            RouteId::FlashSale => self.settings.routes.flash_sale.authenticate,
            RouteId::Inventory => self.settings.routes.inventory.authenticate,
        }
    }
}
