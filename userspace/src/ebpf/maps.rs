//! The seam between the sync logic and the kernel's load-balancing maps.
//!
//! [`LbMaps`] is what [`super::sync::LbSyncer`] talks to. [`AyaLbMaps`] drives the real
//! pinned maps; tests drive a fake that checks the datapath's invariant after every single
//! write and can inject failures (see `sync.rs`). The same syncer code runs against both.

use std::io;

use aya::maps::{HashMap, MapData, MapError};
use kpr_common::{Backend4Value, Service4Key, Service4Value};

/// A failed map operation, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map}: {detail}")]
pub struct MapOpError {
    pub op: &'static str,
    pub map: &'static str,
    pub detail: String,
}

/// Operations the syncer needs on the services and backends maps.
pub trait LbMaps {
    /// Every backend entry (id → value), for restoring state after a restart.
    fn dump_backends(&self) -> Result<Vec<(u32, Backend4Value)>, MapOpError>;
    /// Every services entry, for restoring state after a restart.
    fn dump_services(&self) -> Result<Vec<(Service4Key, Service4Value)>, MapOpError>;
    fn put_backend(&mut self, id: u32, value: &Backend4Value) -> Result<(), MapOpError>;
    /// Deleting an absent entry is not an error.
    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError>;
    fn put_service(&mut self, key: &Service4Key, value: &Service4Value) -> Result<(), MapOpError>;
    /// Deleting an absent entry is not an error.
    fn delete_service(&mut self, key: &Service4Key) -> Result<(), MapOpError>;
}

/// The real maps, as loaded (and pinned) by [`super::EbpfDataplane`].
pub struct AyaLbMaps {
    pub(super) services: HashMap<MapData, Service4Key, Service4Value>,
    pub(super) backends: HashMap<MapData, u32, Backend4Value>,
}

fn op_error(op: &'static str, map: &'static str, e: MapError) -> MapOpError {
    MapOpError {
        op,
        map,
        detail: e.to_string(),
    }
}

/// Deleting a key that is already gone is what we wanted anyway.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl LbMaps for AyaLbMaps {
    fn dump_backends(&self) -> Result<Vec<(u32, Backend4Value)>, MapOpError> {
        self.backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| op_error("dump", kpr_common::BACKENDS_MAP, e))
    }

    fn dump_services(&self) -> Result<Vec<(Service4Key, Service4Value)>, MapOpError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| op_error("dump", kpr_common::SERVICES_MAP, e))
    }

    fn put_backend(&mut self, id: u32, value: &Backend4Value) -> Result<(), MapOpError> {
        self.backends
            .insert(id, value, 0)
            .map_err(|e| op_error("update", kpr_common::BACKENDS_MAP, e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapOpError> {
        absent_ok(self.backends.remove(&id))
            .map_err(|e| op_error("delete", kpr_common::BACKENDS_MAP, e))
    }

    fn put_service(&mut self, key: &Service4Key, value: &Service4Value) -> Result<(), MapOpError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| op_error("update", kpr_common::SERVICES_MAP, e))
    }

    fn delete_service(&mut self, key: &Service4Key) -> Result<(), MapOpError> {
        absent_ok(self.services.remove(key))
            .map_err(|e| op_error("delete", kpr_common::SERVICES_MAP, e))
    }
}
