//! Test-only helpers: a mock Kubernetes API server in the tower-test style that asserts each
//! request the code under test makes, in order, and answers it.

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

/// A check on a request body.
pub type BodyCheck = Box<dyn FnOnce(&Value) + Send>;

/// One expected request: method, path (without query), and the answer.
pub struct Expect {
    /// HTTP method.
    pub method: Method,
    /// Request path, e.g. `/apis/apps/v1/namespaces/ns/deployments/x`.
    pub path: String,
    /// Status code of the answer.
    pub status: StatusCode,
    /// Body of the answer.
    pub body: Value,
    /// Checks on the request body.
    pub check: Option<BodyCheck>,
}

impl Expect {
    /// Expects `method path` and answers `status` with `body`.
    pub fn new(method: Method, path: impl Into<String>, status: u16, body: Value) -> Self {
        Expect {
            method,
            path: path.into(),
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
            check: None,
        }
    }

    /// Also runs `check` on the JSON request body.
    pub fn checking(mut self, check: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }
}

/// A Kubernetes `Status` error body.
pub fn status_body(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock {reason}"), "reason": reason, "code": code
    })
}

/// A client backed by a mock server that serves `script` in order; the returned task fails
/// the test if a request differs from the script, and finishes once the script is served.
pub fn mock_client(script: Vec<Expect>) -> (Client, tokio::task::JoinHandle<()>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let task = tokio::spawn(serve(handle, script));
    (client, task)
}

async fn serve(mut handle: Handle<Request<Body>, Response<Body>>, script: Vec<Expect>) {
    for (i, expect) in script.into_iter().enumerate() {
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request()).await;
        let Ok(Some((request, send))) = next else {
            panic!("request {i} ({} {}) never came", expect.method, expect.path);
        };
        assert_eq!(
            request.method(),
            expect.method,
            "request {i}: method of {}",
            request.uri()
        );
        assert_eq!(request.uri().path(), expect.path, "request {i}: path");
        let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
        if let Some(check) = expect.check {
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            check(&body);
        }
        let response = Response::builder()
            .status(expect.status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&expect.body).unwrap_or_default()))
            .unwrap_or_else(|_| Response::new(Body::empty()));
        send.send_response(response);
    }
}
