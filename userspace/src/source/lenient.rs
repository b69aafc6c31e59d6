//! Objects decoded one by one, so that one malformed object cannot hide the others.
//!
//! kube-rs decodes a list page (and every watch event) as a whole typed value: one Service
//! with, say, a port of the wrong JSON type would fail the list of every Service, and the
//! watch would keep the last state forever. The API server validates what it stores, so this
//! is about robustness against what should not happen (a buggy aggregated API, a proxy in
//! between, a hand-fed fake): [`Lenient`] decodes each object on its own; one that does not
//! decode is kept as its metadata and the reason, and the source skips it with one log line,
//! as kube-proxy skips what it cannot use.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// An object as the API server sent it: decoded as `K` (shared with the snapshots made from
/// the store), or why not.
#[derive(Clone, Debug, PartialEq)]
pub struct Lenient<K> {
    meta: ObjectMeta,
    pub decoded: Result<Arc<K>, String>,
}

impl<K> Lenient<K> {
    /// `namespace/name` (or what of it could be read).
    pub fn name(&self) -> String {
        format!(
            "{}/{}",
            self.meta.namespace.as_deref().unwrap_or("?"),
            self.meta.name.as_deref().unwrap_or("?")
        )
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only JSON that is not JSON at all fails here (and then the whole page is bad).
        let value = serde_json::Value::deserialize(d)?;
        let meta = value
            .get("metadata")
            .and_then(|m| ObjectMeta::deserialize(m).ok())
            .unwrap_or_default();
        let decoded = serde_path_to_error::deserialize::<_, K>(&value)
            .map(Arc::new)
            .map_err(|e| {
                let path = e.path().to_string();
                format!("{path}: {}", e.into_inner())
            });
        Ok(Lenient { meta, decoded })
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    #[test]
    fn a_bad_object_decodes_alone_with_its_name_and_the_reason() {
        let list: Vec<Lenient<Service>> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "good", "namespace": "a"}, "spec": {"ports": [{"port": 80}]}},
            {"metadata": {"name": "bad", "namespace": "a"}, "spec": {"ports": [{"port": "eighty"}]}},
            {"metadata": 7, "spec": {}},
        ]))
        .unwrap();
        assert!(list[0].decoded.is_ok());
        let err = list[1].decoded.as_ref().unwrap_err();
        assert_eq!(list[1].name(), "a/bad");
        assert!(err.starts_with("spec.ports[0].port: "), "{err}");
        assert_eq!(list[2].name(), "?/?");
        assert!(list[2].decoded.is_err());
    }
}
