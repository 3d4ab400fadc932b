//! `ExecutorApi` on HashiCorp Nomad (work in progress): runners as Nomad jobs, as Poseidon runs
//! them.
