//! Durable embedded store for environment and runner records (being written).
