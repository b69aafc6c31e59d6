//! kpr: a kube-proxy replacement. The agent's library: the pure model, the sources that feed
//! it, the dataplane backends that program the node, and the runner that ties them together.
pub mod admin;
pub mod changes;
pub mod cidr;
pub mod config;
pub mod conntrack_sysctl;
pub mod dataplane;
pub mod ebpf;
#[cfg(test)]
mod golden;
pub mod health;
mod http_server;
pub mod import;
pub mod inspect;
pub mod ipvs;
pub mod localaddr;
pub mod metrics;
pub mod model;
pub mod netfilter;
pub mod netlink;
pub mod nft;
pub mod nodeaddr;
pub mod observers;
pub mod runner;
pub mod service_health;
pub mod sockdiag;
pub mod source;
