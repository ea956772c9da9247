//! Publishing accepted orders to Kafka with an idempotent producer (acks=all), and creating the
//! topic when it is missing.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flash_sale_common::configuration::KafkaSettings;
use flash_sale_common::domain::OrderEvent;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

/// Why a publish did not get the broker's ack.
#[derive(Debug)]
pub enum PublishError {
    /// The producer's in-memory queue is full (`kafka.max_buffered_messages`): shed load.
    QueueFull,
    /// The broker did not acknowledge within `kafka.message_timeout_ms`, or refused.
    Failed(KafkaError),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueueFull => f.write_str("the producer queue is full"),
            Self::Failed(e) => write!(f, "publish failed: {e}"),
        }
    }
}

/// The order-event producer. Cloning shares one librdkafka producer.
///
/// An idempotent producer can reach a state it cannot leave (a fatal error, or the broker
/// refusing its sequence numbers after a broker restart): librdkafka's answer is a new producer
/// instance. The publisher rebuilds itself once per failing instance (`generation`) and counts it
/// in `flash_sale_kafka_producer_resets_total`; requests that were on the old instance get 503
/// and their reservations are undone, like any failed publish.
#[derive(Clone)]
pub struct Publisher {
    current: Arc<RwLock<(u64, FutureProducer)>>,
    settings: Arc<KafkaSettings>,
}

fn create_producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", settings.linger_ms.to_string())
        .set(
            "message.timeout.ms",
            settings.message_timeout_ms.to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            settings.max_buffered_messages.to_string(),
        )
        .create()
}

impl Publisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        Ok(Self {
            current: Arc::new(RwLock::new((0, create_producer(settings)?))),
            settings: Arc::new(settings.clone()),
        })
    }

    fn producer(&self) -> (u64, FutureProducer) {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the producer of `generation` with a new one (if nobody did already).
    fn reset(&self, generation: u64, cause: &KafkaError) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 != generation {
            return;
        }
        match create_producer(&self.settings) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut current.1, fresh);
                current.0 += 1;
                metrics::counter!("flash_sale_kafka_producer_resets_total").increment(1);
                tracing::warn!(error = %cause, "Kafka producer rebuilt after an unrecoverable error");
                std::thread::spawn(move || {
                    let _ = old.flush(Duration::from_secs(5));
                });
            }
            Err(error) => tracing::error!(%error, "cannot rebuild the Kafka producer"),
        }
    }

    /// Publishes one order event, keyed by order number, and waits for the broker's ack.
    pub async fn publish(&self, event: &OrderEvent) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(event).expect("an order event always serializes");
        let (generation, producer) = self.producer();
        let record = FutureRecord::to(&self.settings.topic)
            .key(event.order_no.as_str())
            .payload(&payload);
        let started = Instant::now();
        // Zero queue timeout: a full local queue is an immediate, explicit refusal.
        let result = producer.send(record, Duration::ZERO).await;
        metrics::histogram!("flash_sale_kafka_publish_duration_seconds").record(started.elapsed());
        match result {
            Ok(_) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::counter!("flash_sale_kafka_publish_failures_total").increment(1);
                Err(PublishError::QueueFull)
            }
            Err((error, _)) => {
                metrics::counter!("flash_sale_kafka_publish_failures_total").increment(1);
                // A timeout is the broker being away; anything else, or a fatal state, means this
                // instance will not recover by itself.
                let timed_out = matches!(
                    error,
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
                );
                if !timed_out || producer.client().fatal_error().is_some() {
                    self.reset(generation, &error);
                }
                Err(PublishError::Failed(error))
            }
        }
    }

    /// Waits for every queued message to be acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer().1.flush(timeout)
    }
}

/// Creates the order topic if the broker does not have it yet.
pub async fn ensure_topic(
    settings: &KafkaSettings,
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()?;
    let topic = NewTopic::new(
        &settings.topic,
        partitions,
        TopicReplication::Fixed(replication),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic = %name, %code, "cannot create the order topic");
                });
            }
        }
    }
    Ok(())
}
