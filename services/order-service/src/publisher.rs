//! Publishing accepted orders to Kafka with an idempotent producer (acks=all), and creating the
//! topic when it is missing.
//!
//! Orders go to the broker in lots: one task gathers the orders waiting to be published for up
//! to `kafka.linger_ms` (or until `kafka.lot_max_orders`), hands them to librdkafka as one
//! record, and answers each order when the broker has acknowledged that record. The broker's
//! cost is per record (nisshi's SQLite storage runs an insert per record and a header query per
//! record fetched), so a lot of fifty costs it about what one order did (docs/performance.md,
//! "Orders in lots"). A 202 means what it meant before: the order is on the broker's durable log.
//!
//! Hand-written because the lots are records of the application's format ([`encode_lot`]), which
//! librdkafka's own batching (of records) cannot make: a channel, a timer and a loop.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flash_sale_common::configuration::KafkaSettings;
use flash_sale_common::domain::{OrderEvent, OrderNo, encode_lot};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Why a publish did not get the broker's ack.
#[derive(Debug, Clone)]
pub enum PublishError {
    /// `kafka.max_buffered_messages` orders are already waiting for the broker: shed load.
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

/// The order-event producer. Cloning shares one librdkafka producer and one lot gatherer.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::UnboundedSender<Waiting>,
    /// One permit per order waiting for the broker, `kafka.max_buffered_messages` in all.
    room: Arc<Semaphore>,
    producers: Arc<Producers>,
}

/// An order on its way: its event, serialized, and whom to tell how it went.
struct Waiting {
    event: Vec<u8>,
    order_no: OrderNo,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// The librdkafka producer in use.
///
/// An idempotent producer can reach a state it cannot leave (a fatal error, or the broker
/// refusing its sequence numbers after a broker restart): librdkafka's answer is a new producer
/// instance. The publisher rebuilds itself once per failing instance (`generation`) and counts it
/// in `flash_sale_kafka_producer_resets_total`; orders that were on the old instance get 503
/// and their reservations are undone, like any failed publish.
struct Producers {
    current: RwLock<(u64, FutureProducer)>,
    settings: KafkaSettings,
}

fn create_producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The gatherer lingers already; librdkafka still puts the lots that meet in its queue
        // into one request.
        .set("linger.ms", "0")
        // A lot waits at most `linger_ms` for the gatherer, so this keeps a publish within
        // `message_timeout_ms` of its start (the fence counts on that bound).
        .set(
            "message.timeout.ms",
            settings
                .message_timeout_ms
                .saturating_sub(settings.linger_ms)
                .max(1)
                .to_string(),
        )
        .set(
            "queue.buffering.max.messages",
            settings.max_buffered_messages.to_string(),
        )
        .create()
}

impl Publisher {
    /// Creates the producer and starts the gatherer, which ends when the last handle is dropped.
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let producers = Arc::new(Producers {
            current: RwLock::new((0, create_producer(settings)?)),
            settings: settings.clone(),
        });
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(gather(producers.clone(), waiting));
        let room = usize::try_from(settings.max_buffered_messages).unwrap_or(usize::MAX);
        Ok(Self {
            queue,
            room: Arc::new(Semaphore::new(room.min(Semaphore::MAX_PERMITS))),
            producers,
        })
    }

    /// Publishes one order event, in the next lot, and waits for the broker's ack.
    pub async fn publish(&self, event: &OrderEvent) -> Result<(), PublishError> {
        let started = Instant::now();
        let result = self.publish_in_lot(event).await;
        metrics::histogram!("flash_sale_kafka_publish_duration_seconds").record(started.elapsed());
        if result.is_err() {
            metrics::counter!("flash_sale_kafka_publish_failures_total").increment(1);
        }
        result
    }

    async fn publish_in_lot(&self, event: &OrderEvent) -> Result<(), PublishError> {
        // An immediate, explicit refusal when too many orders wait already.
        let _permit = self
            .room
            .try_acquire()
            .map_err(|_| PublishError::QueueFull)?;
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            event: serde_json::to_vec(event).expect("an order event always serializes"),
            order_no: event.order_no.clone(),
            reply,
        };
        // Only a gatherer that is gone drops its end: the runtime is stopping.
        let gone = || PublishError::Failed(KafkaError::Canceled);
        self.queue.send(waiting).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Waits for every record librdkafka holds to be acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producers.producer().1.flush(timeout)
    }
}

/// Gathers the orders waiting into lots and sends each lot as one record.
async fn gather(producers: Arc<Producers>, mut queue: mpsc::UnboundedReceiver<Waiting>) {
    let most = producers.settings.lot_max_orders.max(1);
    let linger = Duration::from_millis(producers.settings.linger_ms);
    let mut lot = Vec::with_capacity(most);
    while queue.recv_many(&mut lot, most).await > 0 {
        let deadline = tokio::time::Instant::now() + linger;
        while lot.len() < most {
            let room = most - lot.len();
            match tokio::time::timeout_at(deadline, queue.recv_many(&mut lot, room)).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        producers.send(std::mem::replace(&mut lot, Vec::with_capacity(most)));
    }
}

impl Producers {
    fn producer(&self) -> (u64, FutureProducer) {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hands one lot to librdkafka, keyed by its first order number, and answers its orders
    /// once the broker has acknowledged it (or not).
    fn send(self: &Arc<Self>, lot: Vec<Waiting>) {
        metrics::histogram!("flash_sale_kafka_lot_size").record(lot.len() as f64);
        let payload = encode_lot(lot.iter().map(|w| w.event.as_slice()));
        let (generation, producer) = self.producer();
        let record = FutureRecord::to(&self.settings.topic)
            .key(lot[0].order_no.as_str())
            .payload(&payload);
        match producer.send_result(record) {
            Ok(delivery) => {
                let producers = self.clone();
                tokio::spawn(async move {
                    let result = match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((error, _))) => Err(error),
                        Err(_) => Err(KafkaError::Canceled),
                    };
                    producers.answer(lot, generation, &producer, result);
                });
            }
            Err((error, _)) => self.answer(lot, generation, &producer, Err(error)),
        }
    }

    fn answer(
        &self,
        lot: Vec<Waiting>,
        generation: u64,
        producer: &FutureProducer,
        result: Result<(), KafkaError>,
    ) {
        let result = result.map_err(|error| match error {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => PublishError::QueueFull,
            error => {
                // A timeout is the broker being away; anything else, or a fatal state, means
                // this instance will not recover by itself.
                let timed_out = matches!(
                    error,
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
                );
                if !timed_out || producer.client().fatal_error().is_some() {
                    self.reset(generation, &error);
                }
                PublishError::Failed(error)
            }
        });
        for waiting in lot {
            let _ = waiting.reply.send(result.clone());
        }
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
