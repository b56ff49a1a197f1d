//! The `cuda` feature: without a GPU the NCCL path must refuse clearly; with one (2 ranks as
//! threads on GPU 0 is not allowed by NCCL, so this only checks setup on one rank).
#![cfg(feature = "cuda")]

use std::time::Duration;

use rustspeed_comm::nccl::{nccl_available, NcclComm};
use rustspeed_comm::{ErrorKind, Store};

#[test]
fn without_cuda_nccl_says_not_supported() {
    let store = Store::local_server(Duration::from_secs(5)).unwrap();
    match NcclComm::new(&store, 0, 1, 0) {
        Ok(c) => {
            assert!(nccl_available());
            assert_eq!(c.world_size(), 1);
        }
        Err(e) if !nccl_available() => {
            assert_eq!(e.kind, ErrorKind::NotSupported, "{e}");
            assert!(
                e.message
                    .starts_with("not supported yet: NCCL on this machine"),
                "{e}"
            );
        }
        Err(e) => panic!("NCCL is available but setup failed: {e}"),
    }
}
