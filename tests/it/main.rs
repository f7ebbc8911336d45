//! The one integration-test binary: regcache in-process against a fake upstream (faults,
//! counts) and against the real docker-registry with skopeo and containerd's ctr.

mod air_gap;
mod binary;
mod core_pull;
mod deploy_files;
mod disks;
mod exhaustion;
mod fake_upstream;
mod faults;
mod harness;
mod hostile_upstream;
mod maintain;
mod operate;
mod peers;
mod prefetch;
mod real_auth;
mod real_peers;
mod rights;
mod seaweed_cluster;
mod shared_bucket;
mod signed_pulls;
mod status_page;
mod upstream_reality;
