//! End-to-end tests of Atomic against a real cluster live in `e2e.rs`; they run when
//! `KUBECONFIG` names a cluster and skip with a message otherwise.
