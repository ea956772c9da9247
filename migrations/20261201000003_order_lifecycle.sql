-- An order's life after CREATED: payment, cancellation, expiry, and stock that sells again
-- (docs/orders.md). orders.status codes: 0 CREATED, 1 PAID, 2 CANCELLED, 3 EXPIRED. (PENDING
-- is an order still in the queue: it is not in MySQL yet.)

-- inventory: the price of one item, and how long a buyer has to pay once their order is in.
ALTER TABLE inventory
  ADD COLUMN price_cents BIGINT NOT NULL DEFAULT 0 AFTER total_stock,
  ADD COLUMN pay_timeout_secs INT NOT NULL DEFAULT 900 AFTER price_cents,
  ADD CONSTRAINT chk_inventory_price CHECK (price_cents >= 0),
  ADD CONSTRAINT chk_inventory_pay_timeout CHECK (pay_timeout_secs > 0);

-- orders: what the buyer owes and until when, and how the order ended.
--   pay_deadline  reserved_at + the activity's pay_timeout_secs (NULL for orders written before
--                 this migration: they never expire by themselves);
--   payment_ref   the payment provider's id of the payment, unique: the callback's idempotency
--                 key;
--   live_user_id  the buyer while the order holds stock (CREATED or PAID), else NULL: the unique
--                 key on it keeps one live order per (activity, user) and lets a buyer whose
--                 order was cancelled or expired buy again.
ALTER TABLE orders
  ADD COLUMN amount_cents BIGINT NOT NULL DEFAULT 0 AFTER quantity,
  ADD COLUMN pay_deadline DATETIME(3) NULL AFTER reserved_at,
  ADD COLUMN paid_at DATETIME(3) NULL AFTER pay_deadline,
  ADD COLUMN closed_at DATETIME(3) NULL AFTER paid_at,
  ADD COLUMN payment_ref VARCHAR(64) NULL AFTER closed_at,
  ADD COLUMN live_user_id BIGINT
    GENERATED ALWAYS AS (CASE WHEN status IN (0, 1) THEN user_id END) STORED,
  ADD CONSTRAINT chk_orders_status CHECK (status IN (0, 1, 2, 3)),
  ADD UNIQUE KEY uk_payment_ref (payment_ref),
  ADD UNIQUE KEY uk_activity_live_user (activity_id, live_user_id),
  ADD KEY idx_status_deadline (status, pay_deadline),
  DROP KEY uk_activity_user;

-- The stock of a cancelled or expired order, on its way back to Redis (the outbox). A row is
-- written in the transaction that closes the order and gives the stock back to
-- inventory.stock; the primary key makes a second return of the same order impossible.
-- applied_at is set once Redis has the stock back (restore.lua, idempotent by order number).
CREATE TABLE IF NOT EXISTS stock_returns (
  order_no VARCHAR(64) NOT NULL PRIMARY KEY,
  activity_id BIGINT NOT NULL,
  user_id BIGINT NOT NULL,
  quantity INT NOT NULL,
  reason TINYINT NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  applied_at DATETIME(3) NULL,
  KEY idx_unapplied (applied_at, created_at),
  CONSTRAINT chk_stock_returns_reason CHECK (reason IN (2, 3))
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
