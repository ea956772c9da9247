-- What correctness needs on top of the seed's schema.
--
-- inventory: a name, the sale window (NULL = no bound, so the seed's bare
-- `INSERT INTO inventory (activity_id, stock) VALUES (1, 10000)` is open at once), the total
-- stock ever put on sale (NULL until the warm-up fills it in as stock + ordered), and a CHECK
-- that makes a negative stock impossible whatever the application does.
ALTER TABLE inventory
  ADD COLUMN name VARCHAR(128) NULL AFTER activity_id,
  ADD COLUMN start_time DATETIME(3) NULL AFTER stock,
  ADD COLUMN end_time DATETIME(3) NULL AFTER start_time,
  ADD COLUMN total_stock INT NULL AFTER end_time,
  ADD CONSTRAINT chk_inventory_stock CHECK (stock >= 0);

-- orders: one order per (activity, user) enforced by the database, and when Redis reserved it.
ALTER TABLE orders
  ADD COLUMN reserved_at DATETIME(3) NULL AFTER status,
  ADD CONSTRAINT chk_orders_quantity CHECK (quantity > 0),
  ADD UNIQUE KEY uk_activity_user (activity_id, user_id);
