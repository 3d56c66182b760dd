//! The checked-in CRDs match the Rust types, and their validation rules (schema and CEL) reject
//! what they should, evaluated client-side by kube's CEL validator.

use atomic_operator::api::{AtomicTask, ModelDeployment};
use kube::core::cel::validate_cel;
use serde_json::json;

#[test]
fn checked_in_crds_match_the_generated_ones() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds");
    for (name, yaml) in atomic_operator::api::crd_files().unwrap() {
        let path = format!("{dir}/{name}");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        assert!(
            on_disk == yaml,
            "{path} is out of date: run `cargo run -p atomic-operator --bin crdgen` and commit the result"
        );
    }
}

fn task(value: serde_json::Value) -> AtomicTask {
    serde_json::from_value(value).unwrap()
}

fn base_task() -> serde_json::Value {
    json!({
        "apiVersion": "atomic.dev/v1alpha1",
        "kind": "AtomicTask",
        "metadata": {"name": "reply", "namespace": "default"},
        "spec": {"model": "writer", "operation": "generate", "input": {"text": "hello"}}
    })
}

fn errors(t: &AtomicTask) -> String {
    match validate_cel(t) {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    }
}

#[test]
fn a_valid_task_passes() {
    assert_eq!(errors(&task(base_task())), "");
}

#[test]
fn a_task_may_not_depend_on_itself() {
    let mut t = base_task();
    t["spec"]["dependsOn"] = json!(["intent", "reply"]);
    assert!(errors(&task(t)).contains("may not depend on itself"));
}

#[test]
fn duplicate_dependencies_are_rejected() {
    let mut t = base_task();
    t["spec"]["dependsOn"] = json!(["intent", "intent"]);
    assert!(errors(&task(t)).contains("duplicates"));
}

#[test]
fn model_is_required_unless_http() {
    let mut t = base_task();
    t["spec"].as_object_mut().unwrap().remove("model");
    assert!(errors(&task(t)).contains("spec.model is required"));

    let mut t = base_task();
    t["spec"] = json!({"operation": "http", "http": {"url": "http://mail.local/send"}});
    assert_eq!(errors(&task(t)), "");
}

#[test]
fn http_block_only_with_http_operation() {
    let mut t = base_task();
    t["spec"]["http"] = json!({"url": "http://x"});
    assert!(errors(&task(t)).contains("spec.http is required for operation http"));
}

#[test]
fn input_needs_exactly_one_source() {
    let mut t = base_task();
    t["spec"]["input"] = json!({
        "text": "a",
        "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}
    });
    assert!(errors(&task(t)).contains("exactly one of text and valueFrom"));
}

#[test]
fn model_replicas_min_must_not_exceed_max() {
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "atomic.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/minilm"}}},
            "replicas": {"min": 3, "max": 2}
        }
    }))
    .unwrap();
    let e = match validate_cel(&md) {
        Ok(()) => String::new(),
        Err(e) => format!("{e:?}"),
    };
    assert!(e.contains("replicas.min must not exceed replicas.max"), "{e}");
}

#[test]
fn model_source_needs_exactly_one_kind() {
    let md: ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "atomic.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"model": {"source": {}}}
    }))
    .unwrap();
    assert!(format!("{:?}", validate_cel(&md)).contains("exactly one of persistentVolumeClaim and hostPath"));
}

#[test]
fn crds_have_printer_columns_and_subresources() {
    use kube::CustomResourceExt;
    let crd = AtomicTask::crd();
    let version = &crd.spec.versions[0];
    let columns: Vec<_> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for wanted in ["Phase", "Model", "Attempts", "Age"] {
        assert!(columns.contains(&wanted), "{wanted} missing from {columns:?}");
    }
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let md = ModelDeployment::crd();
    let scale = md.spec.versions[0]
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .as_ref()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas.min");
    assert_eq!(scale.label_selector_path.as_deref(), Some(".status.selector"));
}
