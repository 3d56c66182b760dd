//! Tells the dispatcher which worker pods are ready, from the EndpointSlices of the worker
//! Services (they carry the Service's `atomic.dev/model` label).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::dispatch::Lane;
use crate::workload::MODEL_LABEL;

/// Ready `ip:port` addresses of the worker pods, per lane, from the slices seen so far.
#[derive(Default)]
pub struct EndpointIndex {
    /// Addresses by slice (namespace, name), with the slice's lane.
    slices: BTreeMap<(String, String), (Lane, BTreeSet<String>)>,
}

impl EndpointIndex {
    /// Records a slice (added or changed); returns its lane and the lane's ready addresses.
    pub fn apply(&mut self, slice: &EndpointSlice) -> Option<(Lane, Vec<String>)> {
        let lane = lane_of(slice)?;
        let key = slice_key(slice);
        self.slices.insert(key, (lane.clone(), ready_addresses(slice)));
        Some((lane.clone(), self.addresses(&lane)))
    }

    /// Forgets a deleted slice; returns its lane and the lane's remaining ready addresses.
    pub fn remove(&mut self, slice: &EndpointSlice) -> Option<(Lane, Vec<String>)> {
        let (lane, _) = self.slices.remove(&slice_key(slice))?;
        let addresses = self.addresses(&lane);
        Some((lane, addresses))
    }

    /// Replaces everything with a full listing (a watch restart); returns every lane touched.
    pub fn reset(&mut self, slices: &[EndpointSlice]) -> Vec<(Lane, Vec<String>)> {
        let before: BTreeSet<_> = self.slices.values().map(|(l, _)| lane_key(l)).collect();
        self.slices.clear();
        for slice in slices {
            if let Some(lane) = lane_of(slice) {
                self.slices
                    .insert(slice_key(slice), (lane, ready_addresses(slice)));
            }
        }
        let mut lanes: BTreeMap<(String, String), Lane> = BTreeMap::new();
        for (lane, _) in self.slices.values() {
            lanes.insert(lane_key(lane), lane.clone());
        }
        for (namespace, model) in before {
            lanes.entry((namespace.clone(), model.clone())).or_insert(Lane {
                namespace,
                model: Some(model),
            });
        }
        lanes
            .into_values()
            .map(|lane| {
                let addresses = self.addresses(&lane);
                (lane, addresses)
            })
            .collect()
    }

    fn addresses(&self, lane: &Lane) -> Vec<String> {
        let mut all = BTreeSet::new();
        for (l, addresses) in self.slices.values() {
            if l == lane {
                all.extend(addresses.iter().cloned());
            }
        }
        all.into_iter().collect()
    }
}

fn lane_key(lane: &Lane) -> (String, String) {
    (lane.namespace.clone(), lane.model.clone().unwrap_or_default())
}

fn slice_key(slice: &EndpointSlice) -> (String, String) {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

fn lane_of(slice: &EndpointSlice) -> Option<Lane> {
    let model = slice.metadata.labels.as_ref()?.get(MODEL_LABEL)?.clone();
    Some(Lane {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        model: Some(model),
    })
}

/// `ip:port` of every endpoint that is ready (a missing condition counts as ready, as the API
/// documents) and not terminating.
fn ready_addresses(slice: &EndpointSlice) -> BTreeSet<String> {
    let port = slice
        .ports
        .as_ref()
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some("http"))
                .or(ports.first())
        })
        .and_then(|p| p.port);
    let Some(port) = port else { return BTreeSet::new() };
    let mut out = BTreeSet::new();
    for endpoint in slice.endpoints.iter().flatten() {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        if conditions.ready == Some(false) || conditions.terminating == Some(true) {
            continue;
        }
        for address in &endpoint.addresses {
            if address.contains(':') {
                out.insert(format!("[{address}]:{port}"));
            } else {
                out.insert(format!("{address}:{port}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(name: &str, model: &str, endpoints: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("ns".to_owned()),
                labels: Some(BTreeMap::from([(MODEL_LABEL.to_owned(), model.to_owned())])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_owned(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![(*ip).to_owned()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http".to_owned()),
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        }
    }

    #[test]
    fn only_ready_endpoints_count_and_slices_of_a_model_merge() {
        let mut index = EndpointIndex::default();
        let (lane, addrs) = index
            .apply(&slice(
                "a",
                "intent",
                &[
                    ("10.0.0.1", Some(true)),
                    ("10.0.0.2", Some(false)),
                    ("10.0.0.3", None),
                ],
            ))
            .unwrap();
        assert_eq!(lane.model.as_deref(), Some("intent"));
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.3:8080"]);
        let (_, addrs) = index
            .apply(&slice("b", "intent", &[("10.0.0.9", Some(true))]))
            .unwrap();
        assert_eq!(addrs.len(), 3);
        let (_, addrs) = index.remove(&slice("a", "intent", &[])).unwrap();
        assert_eq!(addrs, ["10.0.0.9:8080"]);
    }

    #[test]
    fn reset_reports_lanes_that_lost_every_slice() {
        let mut index = EndpointIndex::default();
        index.apply(&slice("a", "intent", &[("10.0.0.1", Some(true))]));
        let lanes = index.reset(&[slice("b", "reply", &[("10.0.0.5", Some(true))])]);
        let intent = lanes
            .iter()
            .find(|(l, _)| l.model.as_deref() == Some("intent"))
            .unwrap();
        assert!(intent.1.is_empty(), "a vanished model's endpoints are cleared");
        let reply = lanes
            .iter()
            .find(|(l, _)| l.model.as_deref() == Some("reply"))
            .unwrap();
        assert_eq!(reply.1, ["10.0.0.5:8080"]);
    }

    #[test]
    fn slices_without_the_model_label_are_ignored() {
        let mut index = EndpointIndex::default();
        let mut s = slice("x", "m", &[("10.0.0.1", Some(true))]);
        s.metadata.labels = None;
        assert!(index.apply(&s).is_none());
    }
}
