//! Leader election through a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas only one dispatches tasks and no task is sent twice.
//!
//! [`decide`] is the pure rule (who may write the lease and how); [`LeaderElector`] is the thin
//! shell that reads the lease, applies the rule, and writes with optimistic concurrency: every
//! update carries the `resourceVersion` that was read, so of two replicas racing for an expired
//! lease the API server lets exactly one win and answers the other 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

use crate::Error;

/// What a candidate should do with the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// There is no lease: create one naming us.
    Create,
    /// We hold the lease: renew it.
    Renew,
    /// Someone else held it and it expired (or nobody holds it): take it over.
    TakeOver,
    /// Someone else holds a valid lease: follow, and look again after `retry_after`.
    Follow {
        /// Identity of the current leader.
        holder: String,
        /// Time until the lease expires unless renewed.
        retry_after: Duration,
    },
}

/// Decides what `identity` should do with `lease` at `now`. A lease is expired when
/// `renewTime + leaseDurationSeconds < now`; `lease_duration` stands in for a missing
/// `leaseDurationSeconds`.
pub fn decide(
    lease: Option<&LeaseSpec>,
    identity: &str,
    now: Timestamp,
    lease_duration: Duration,
) -> LeaseAction {
    let Some(spec) = lease else {
        return LeaseAction::Create;
    };
    let holder = match spec.holder_identity.as_deref() {
        None | Some("") => return LeaseAction::TakeOver,
        Some(holder) => holder,
    };
    if holder == identity {
        return LeaseAction::Renew;
    }
    let Some(MicroTime(renewed)) = spec.renew_time else {
        // Never renewed: nothing says the holder is alive.
        return LeaseAction::TakeOver;
    };
    let duration = spec
        .lease_duration_seconds
        .map(|s| SignedDuration::from_secs(i64::from(s)))
        .unwrap_or_else(|| SignedDuration::try_from(lease_duration).unwrap_or(SignedDuration::MAX));
    // An expiry beyond the representable range is as good as never.
    let Ok(expiry) = renewed.checked_add(duration) else {
        return LeaseAction::Follow {
            holder: holder.to_owned(),
            retry_after: lease_duration,
        };
    };
    if expiry < now {
        LeaseAction::TakeOver
    } else {
        LeaseAction::Follow {
            holder: holder.to_owned(),
            retry_after: expiry.duration_since(now).unsigned_abs(),
        }
    }
}

/// Competes for one Lease on behalf of this replica.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    renew_every: Duration,
}

impl LeaderElector {
    /// An elector for the Lease `name` in `api`'s namespace. `identity` must be unique per
    /// replica (the pod name); `duration` is how long a lease stays valid without renewal and
    /// `renew_every` (well under `duration`) how often the leader renews it.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
        renew_every: Duration,
    ) -> Self {
        LeaderElector {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            renew_every,
        }
    }

    /// How often [`Self::try_acquire_or_renew`] should be called.
    pub fn renew_every(&self) -> Duration {
        self.renew_every
    }

    /// One round of the election: reads the lease and creates, renews or takes it over when
    /// [`decide`] says so. `Ok(true)` means this replica leads until at least `duration` from
    /// now; losing a race to another writer is `Ok(false)`, not an error. After an `Err` the
    /// caller must stop leading once `duration` has passed since its last successful round,
    /// because another replica may take the lease over from then on.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        // A lease object without a spec is treated as one nobody holds, not as a missing lease:
        // creating it again would only get 409.
        let spec = current
            .as_ref()
            .map(|lease| lease.spec.clone().unwrap_or_default());
        let action = decide(spec.as_ref(), &self.identity, now, self.duration);
        let written = match (action, current) {
            (LeaseAction::Follow { holder, retry_after }, _) => {
                tracing::debug!(lease = %self.name, %holder, ?retry_after, "following");
                return Ok(false);
            }
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held_spec(LeaseSpec::default(), now, true)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseAction::Renew | LeaseAction::TakeOver, None) => {
                // decide only renews or takes over a lease it was given.
                return Ok(false);
            }
            (action, Some(mut lease)) => {
                let spec = lease.spec.take().unwrap_or_default();
                lease.spec = Some(self.held_spec(spec, now, action == LeaseAction::TakeOver));
                // `lease.metadata.resourceVersion` is the one read above: a concurrent writer
                // makes this replace fail with 409.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(lease = %self.name, "lost the lease race");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `spec` with this replica as the holder, renewed at `now`; `acquired` marks a change of
    /// holder (a new lease or a take-over), which resets `acquireTime` and counts a transition.
    fn held_spec(&self, mut spec: LeaseSpec, now: Timestamp, acquired: bool) -> LeaseSpec {
        if acquired {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(match spec.holder_identity {
                // A lease nobody ever held has seen no transition yet.
                Some(_) => spec.lease_transitions.unwrap_or(0).saturating_add(1),
                None => spec.lease_transitions.unwrap_or(0),
            });
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX));
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    const DURATION: Duration = Duration::from_secs(15);

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn held(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(ts(renewed))),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decide_creates_missing_lease() {
        assert_eq!(
            decide(None, "me", ts("2025-01-01T00:00:00Z"), DURATION),
            LeaseAction::Create
        );
    }

    #[test]
    fn decide_renews_own_lease_even_when_expired() {
        let spec = held("me", "2025-01-01T00:00:00Z");
        for now in ["2025-01-01T00:00:05Z", "2025-01-01T01:00:00Z"] {
            assert_eq!(decide(Some(&spec), "me", ts(now), DURATION), LeaseAction::Renew);
        }
    }

    #[test]
    fn decide_follows_valid_lease_of_another() {
        let spec = held("other", "2025-01-01T00:00:00Z");
        assert_eq!(
            decide(Some(&spec), "me", ts("2025-01-01T00:00:05Z"), DURATION),
            LeaseAction::Follow {
                holder: "other".into(),
                retry_after: Duration::from_secs(10)
            }
        );
        // Exactly at expiry the lease is still valid (expired means strictly before now).
        assert_eq!(
            decide(Some(&spec), "me", ts("2025-01-01T00:00:15Z"), DURATION),
            LeaseAction::Follow {
                holder: "other".into(),
                retry_after: Duration::ZERO
            }
        );
    }

    #[test]
    fn decide_takes_over_expired_or_unheld_lease() {
        let spec = held("other", "2025-01-01T00:00:00Z");
        assert_eq!(
            decide(Some(&spec), "me", ts("2025-01-01T00:00:15.001Z"), DURATION),
            LeaseAction::TakeOver
        );
        let unheld = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held("x", "2025-01-01T00:00:00Z")
        };
        assert_eq!(
            decide(Some(&unheld), "me", ts("2025-01-01T00:00:01Z"), DURATION),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide(
                Some(&LeaseSpec::default()),
                "me",
                ts("2025-01-01T00:00:01Z"),
                DURATION
            ),
            LeaseAction::TakeOver
        );
        let never_renewed = LeaseSpec {
            renew_time: None,
            ..held("other", "2025-01-01T00:00:00Z")
        };
        assert_eq!(
            decide(Some(&never_renewed), "me", ts("2025-01-01T00:00:01Z"), DURATION),
            LeaseAction::TakeOver
        );
    }

    #[test]
    fn decide_uses_own_duration_when_lease_has_none() {
        let spec = LeaseSpec {
            lease_duration_seconds: None,
            ..held("other", "2025-01-01T00:00:00Z")
        };
        let now = ts("2025-01-01T00:00:20Z");
        assert_eq!(
            decide(Some(&spec), "me", now, Duration::from_secs(30)),
            LeaseAction::Follow {
                holder: "other".into(),
                retry_after: Duration::from_secs(10)
            }
        );
        assert_eq!(
            decide(Some(&spec), "me", now, Duration::from_secs(10)),
            LeaseAction::TakeOver
        );
    }

    // --- mock API server -------------------------------------------------------------------

    const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn elector() -> (LeaderElector, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let elector = LeaderElector::new(
            Api::default_namespaced(client),
            "atomic-operator",
            "me",
            DURATION,
            Duration::from_secs(5),
        );
        (elector, handle)
    }

    fn respond(status: StatusCode, body: &Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    fn status_body(code: u16, reason: &str) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("leases.coordination.k8s.io \"atomic-operator\": {reason}"),
            "reason": reason, "code": code,
        })
    }

    fn lease_json(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "atomic-operator", "namespace": "default", "resourceVersion": "42"},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": 15,
                "renewTime": MicroTime(renewed),
                "acquireTime": MicroTime(renewed),
                "leaseTransitions": transitions,
            },
        })
    }

    async fn expect_get(handle: &mut Handle, answer: Response<Body>) {
        let (req, send) = handle.next_request().await.expect("GET lease");
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), format!("{LEASE_PATH}/atomic-operator"));
        send.send_response(answer);
    }

    async fn body_json(req: Request<Body>) -> Value {
        let bytes = req.into_body().collect_bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn missing_lease_is_created() {
        let (elector, mut handle) = elector();
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::NOT_FOUND, &status_body(404, "NotFound")),
            )
            .await;
            let (req, send) = handle.next_request().await.expect("POST lease");
            assert_eq!(req.method(), Method::POST);
            assert_eq!(req.uri().path(), LEASE_PATH);
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["name"], "atomic-operator");
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            assert_eq!(body["spec"]["leaseTransitions"], 0);
            send.send_response(respond(StatusCode::CREATED, &body));
        });
        assert!(elector.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn create_conflict_means_follower() {
        let (elector, mut handle) = elector();
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::NOT_FOUND, &status_body(404, "NotFound")),
            )
            .await;
            let (req, send) = handle.next_request().await.expect("POST lease");
            assert_eq!(req.method(), Method::POST);
            send.send_response(respond(StatusCode::CONFLICT, &status_body(409, "AlreadyExists")));
        });
        assert!(!elector.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_with_resource_version() {
        let (elector, mut handle) = elector();
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::OK, &lease_json("other", stale, 3)),
            )
            .await;
            let (req, send) = handle.next_request().await.expect("PUT lease");
            assert_eq!(req.method(), Method::PUT);
            assert_eq!(req.uri().path(), format!("{LEASE_PATH}/atomic-operator"));
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "42");
            assert_eq!(body["spec"]["holderIdentity"], "me");
            assert_eq!(body["spec"]["leaseTransitions"], 4);
            assert_ne!(body["spec"]["renewTime"], json!(MicroTime(stale)));
            send.send_response(respond(StatusCode::OK, &body));
        });
        assert!(elector.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn own_lease_is_renewed_without_transition() {
        let (elector, mut handle) = elector();
        let recent = Timestamp::now() - SignedDuration::from_secs(5);
        let server = tokio::spawn(async move {
            expect_get(&mut handle, respond(StatusCode::OK, &lease_json("me", recent, 3))).await;
            let (req, send) = handle.next_request().await.expect("PUT lease");
            assert_eq!(req.method(), Method::PUT);
            let body = body_json(req).await;
            assert_eq!(body["metadata"]["resourceVersion"], "42");
            assert_eq!(body["spec"]["leaseTransitions"], 3);
            assert_eq!(body["spec"]["acquireTime"], json!(MicroTime(recent)));
            send.send_response(respond(StatusCode::OK, &body));
        });
        assert!(elector.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn replace_conflict_means_follower_not_error() {
        let (elector, mut handle) = elector();
        let stale = Timestamp::now() - SignedDuration::from_secs(60);
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::OK, &lease_json("other", stale, 3)),
            )
            .await;
            let (req, send) = handle.next_request().await.expect("PUT lease");
            assert_eq!(req.method(), Method::PUT);
            send.send_response(respond(StatusCode::CONFLICT, &status_body(409, "Conflict")));
        });
        assert!(!elector.try_acquire_or_renew().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn valid_lease_of_another_is_left_alone() {
        let (elector, mut handle) = elector();
        let recent = Timestamp::now() - SignedDuration::from_secs(1);
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::OK, &lease_json("other", recent, 3)),
            )
            .await;
            // No write may follow: the client is dropped after one round, so the next request
            // (if any) would be seen here.
            assert!(handle.next_request().await.is_none());
        });
        assert!(!elector.try_acquire_or_renew().await.unwrap());
        drop(elector);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn other_api_errors_are_errors() {
        let (elector, mut handle) = elector();
        let server = tokio::spawn(async move {
            expect_get(
                &mut handle,
                respond(StatusCode::FORBIDDEN, &status_body(403, "Forbidden")),
            )
            .await;
        });
        assert!(elector.try_acquire_or_renew().await.is_err());
        server.await.unwrap();
    }
}
