//! Black-box tests of the buy path through real Redis, MariaDB and a Kafka-protocol broker,
//! each private to the test and torn down after it.

mod acker;
mod api_answers;
mod bad_input;
mod buyer_page;
mod canary;
mod edge;
mod failures;
mod gateway;
mod helpers;
mod hey;
mod inventory;
mod lifecycle;
mod lots;
mod metric_names;
mod redis_cluster;
mod report;
mod sale;
mod waiting_room;
