//! openraft's storage conformance suite (`openraft::testing::log::Suite`)
//! against the broker group's log store (entries in the commit log) and state
//! machine, each sub-test on a fresh replicated store in its own directory.

use std::sync::Arc;

use halfmq_broker::cluster::log_store::LogStore;
use halfmq_broker::cluster::state_machine::StateMachine;
use halfmq_broker::cluster::types::TypeConfig;
use halfmq_storage::{Store, StoreConfig};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = StoreConfig::new(dir.path());
        cfg.replicated = true;
        // Small segments: entries cross segment ends.
        cfg.segment_bytes = 4096;
        cfg.max_record_bytes = 4096;
        cfg.preallocate_bytes = 0;
        let store = Arc::new(Store::open(cfg).expect("open store"));
        let log = LogStore::open(Arc::clone(&store)).expect("log store");
        let sm = StateMachine::open(store, None).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_passes_openraft_suite() {
    Suite::<TypeConfig, LogStore, StateMachine, Builder, tempfile::TempDir>::test_all(Builder)
        .await
        .expect("suite");
}
