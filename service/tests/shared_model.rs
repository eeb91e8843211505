//! In-process workers share their server's model: one copy of the weights in host
//! memory and one hash of the file, however many devices the server uses.

use starkv_compute::cuda::DeviceChoice;
use starkv_service::ModelFile;
use starkv_service::cluster::{WorkerConfig, WorkerNode};

#[test]
fn workers_opened_on_a_model_file_share_its_weights() {
    let data = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("starkv-test-data");
    let model_path = starkv_compute::fetch::ensure_default_model(&data, &mut |m| eprintln!("{m}"))
        .expect("default model");
    let model = ModelFile::open(&model_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let open = |i: usize| {
        let config = WorkerConfig {
            data_dir: dir.path().join(i.to_string()),
            model_path: model_path.clone(),
            device: DeviceChoice::Cpu,
            shards: 1,
            hot_tier_bytes: 1 << 20,
            gpu_tier_bytes: None,
        };
        WorkerNode::open_on(&config, model.clone()).unwrap()
    };
    let (a, b) = (open(0), open(1));
    for node in [&a, &b] {
        let file = node.service().model_file();
        assert!(
            file.shares_weights_with(&model),
            "a second copy of the weights"
        );
        assert_eq!(file.fingerprint(), model.fingerprint());
        assert_eq!(node.service().model_id(), model.id());
    }
    // A model opened apart is a copy of its own, with the same fingerprint.
    let other = ModelFile::open(&model_path).unwrap();
    assert!(!other.shares_weights_with(&model));
    assert_eq!(other.fingerprint(), model.fingerprint());
}
