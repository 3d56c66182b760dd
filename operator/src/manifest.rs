//! Reading manifests the way `kubectl apply -f DIR` would, for local runs: every `.yaml`/`.yml`
//! file of a folder, multi-document, each document an AtomicTask or a ModelDeployment, checked
//! against the same schema rules (CEL included) that the API server enforces.

use std::path::{Path, PathBuf};

use kube::core::cel::validate_cel;
use serde::Deserialize;

use crate::api::{AtomicTask, ModelDeployment};

/// What a folder of manifests holds.
#[derive(Debug, Default)]
pub struct Manifests {
    /// The tasks, in file order.
    pub tasks: Vec<AtomicTask>,
    /// The model deployments, in file order.
    pub models: Vec<ModelDeployment>,
}

/// A manifest that cannot be used, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}, document {document}: {problem}")]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// 1-based document index inside the file.
    pub document: usize,
    /// What is wrong.
    pub problem: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
}

/// Parses one file's text.
pub fn parse(file: &Path, text: &str, into: &mut Manifests) -> Result<(), Vec<ManifestError>> {
    let mut errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = |problem: String| ManifestError {
            file: file.to_owned(),
            document: index + 1,
            problem,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(at(format!("not valid YAML: {e}")));
                // The rest of the stream cannot be trusted after a syntax error.
                break;
            }
        };
        let json = match serde_json::to_value(&value) {
            Ok(j) => j,
            Err(e) => {
                errors.push(at(format!("cannot be read as JSON: {e}")));
                continue;
            }
        };
        let meta: TypeMeta = match serde_json::from_value(json.clone()) {
            Ok(m) => m,
            Err(e) => {
                errors.push(at(format!("not a Kubernetes object: {e}")));
                continue;
            }
        };
        if meta.api_version.as_deref() != Some("atomic.dev/v1alpha1") {
            errors.push(at(format!(
                "apiVersion is {:?}, expected \"atomic.dev/v1alpha1\"",
                meta.api_version.unwrap_or_default()
            )));
            continue;
        }
        match meta.kind.as_deref() {
            Some("AtomicTask") => match serde_json::from_value::<AtomicTask>(json) {
                Ok(task) => match validate_cel(&task) {
                    Ok(()) if task.metadata.name.is_some() => into.tasks.push(task),
                    Ok(()) => errors.push(at("metadata.name is missing".to_owned())),
                    Err(e) => errors.push(at(format!("invalid AtomicTask: {e}"))),
                },
                Err(e) => errors.push(at(format!("invalid AtomicTask: {e}"))),
            },
            Some("ModelDeployment") => match serde_json::from_value::<ModelDeployment>(json) {
                Ok(md) => match validate_cel(&md) {
                    Ok(()) if md.metadata.name.is_some() => into.models.push(md),
                    Ok(()) => errors.push(at("metadata.name is missing".to_owned())),
                    Err(e) => errors.push(at(format!("invalid ModelDeployment: {e}"))),
                },
                Err(e) => errors.push(at(format!("invalid ModelDeployment: {e}"))),
            },
            other => errors.push(at(format!(
                "kind {:?} is not AtomicTask or ModelDeployment",
                other.unwrap_or_default()
            ))),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Reads every manifest of a folder (or one file), sorted by file name.
pub fn load(path: &Path) -> Result<Manifests, Vec<ManifestError>> {
    let io_error = |file: &Path, e: std::io::Error| {
        vec![ManifestError {
            file: file.to_owned(),
            document: 0,
            problem: e.to_string(),
        }]
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| io_error(path, e))? {
            let file = entry.map_err(|e| io_error(path, e))?.path();
            if matches!(file.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(file);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut manifests = Manifests::default();
    let mut errors = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io_error(&file, e))?;
        if let Err(mut e) = parse(&file, &text, &mut manifests) {
            errors.append(&mut e);
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Manifests, Vec<ManifestError>> {
        let mut m = Manifests::default();
        parse(Path::new("t.yaml"), text, &mut m).map(|()| m)
    }

    #[test]
    fn the_shipped_example_loads() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/complaints");
        let m = load(Path::new(dir)).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.models.len(), 3);
        assert_eq!(m.tasks.len(), 4);
    }

    #[test]
    fn errors_name_the_document_and_the_problem() {
        let text = "apiVersion: atomic.dev/v1alpha1\nkind: AtomicTask\nmetadata: {name: a}\nspec: {model: m, operation: generate}\n---\napiVersion: atomic.dev/v1alpha1\nkind: AtomicTask\nmetadata: {name: b}\nspec: {model: m, operation: summarise}\n";
        let errors = parse_str(text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].document, 2);
        assert!(errors[0].to_string().contains("summarise"), "{}", errors[0]);
    }

    #[test]
    fn cel_rules_apply_locally() {
        let text = "apiVersion: atomic.dev/v1alpha1\nkind: AtomicTask\nmetadata: {name: a}\nspec: {model: m, operation: generate, dependsOn: [a]}\n";
        let errors = parse_str(text).unwrap_err();
        assert!(
            errors[0].problem.contains("may not depend on itself"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn other_kinds_and_versions_are_named() {
        let errors = parse_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err();
        assert!(errors[0].problem.contains("apiVersion"), "{}", errors[0]);
        let errors = parse_str("apiVersion: atomic.dev/v1alpha1\nkind: Widget\n").unwrap_err();
        assert!(errors[0].problem.contains("Widget"), "{}", errors[0]);
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        let errors = parse_str("apiVersion: [unclosed\n").unwrap_err();
        assert!(errors[0].problem.contains("not valid YAML"));
        assert!(parse_str("").unwrap().tasks.is_empty());
    }
}
