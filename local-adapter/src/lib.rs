//! ExecutorApi on this machine: Linux namespace/cgroup sandboxes (being written).
