//! Prompt templating: renders `prompt` and `http.body` templates with `{{ input.text }}` and
//! `{{ tasks.NAME[.FIELD...] }}` placeholders, and checks statically that a template only
//! references tasks listed in `dependsOn`.
//!
//! A placeholder may end in `| json` to insert the value JSON-encoded (strings quoted and
//! escaped), which is what a JSON request body needs.
//!
//! Task names are Kubernetes names and may themselves contain `.`, so a path such as
//! `tasks.a.b.c` is resolved against the *longest* known task name that it starts with.

use std::collections::BTreeMap;

use serde_json::Value;

/// What a template can see while it is rendered.
#[derive(Clone, Copy, Debug)]
pub struct TemplateContext<'a> {
    /// The task's resolved input text, if it has one.
    pub input_text: Option<&'a str>,
    /// Results of upstream tasks by task name.
    pub tasks: &'a BTreeMap<String, Value>,
}

/// Why a template could not be checked or rendered. Every variant names the placeholder.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without a matching `}}`.
    #[error("unterminated placeholder starting at byte {offset}: `{{{{` without `}}}}`")]
    Unterminated {
        /// Byte offset of the `{{` in the template.
        offset: usize,
    },
    /// `{{ }}` with nothing inside.
    #[error("empty placeholder `{{{{ }}}}` at byte {offset}")]
    Empty {
        /// Byte offset of the `{{` in the template.
        offset: usize,
    },
    /// A `| filter` other than `json`.
    #[error("unknown filter `{filter}` in `{{{{ {placeholder} }}}}`: the only filter is `json`")]
    UnknownFilter {
        /// The placeholder's contents, trimmed.
        placeholder: String,
        /// The filter name.
        filter: String,
    },
    /// The placeholder is neither `input.text` nor `tasks.NAME...`.
    #[error(
        "unknown placeholder `{{{{ {placeholder} }}}}`: expected `input.text` or `tasks.NAME[.FIELD...]`"
    )]
    UnknownRoot {
        /// The placeholder's contents, trimmed.
        placeholder: String,
    },
    /// `{{ input.text }}` is used but the task has no input text.
    #[error("placeholder `{{{{ input.text }}}}` is used but the task has no input text")]
    InputMissing,
    /// The placeholder names a task that is not available.
    #[error("placeholder `{{{{ {placeholder} }}}}` references an unknown task; known tasks: {}", list(.known))]
    UnknownTask {
        /// The placeholder's contents, trimmed.
        placeholder: String,
        /// The task names that could have been referenced (results or `dependsOn`).
        known: Vec<String>,
    },
    /// A field path does not exist in the task's result.
    #[error("placeholder `{{{{ {placeholder} }}}}`: the result of task `{task}` has no `{path}` (missing at `{missing}`; available there: {})", list(.available))]
    MissingField {
        /// The placeholder's contents, trimmed.
        placeholder: String,
        /// The task whose result was searched.
        task: String,
        /// The full field path inside the result.
        path: String,
        /// The first path segment that was not found.
        missing: String,
        /// Object keys or array indices that exist where the lookup failed (empty for scalars).
        available: Vec<String>,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

/// One parsed piece of a template.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'t> {
    Literal(&'t str),
    /// `input.text`; the flag says whether to JSON-encode it.
    Input(bool),
    /// The path after `tasks.`, still to be split into task name and field path, and whether
    /// to JSON-encode the value.
    Task(&'t str, bool),
}

/// Splits a template into literals and placeholders, validating placeholder syntax.
fn parse(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Literal(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or(TemplateError::Unterminated {
            offset: offset + open,
        })?;
        let inner = after[..close].trim();
        if inner.is_empty() {
            return Err(TemplateError::Empty {
                offset: offset + open,
            });
        }
        let (inner, json) = match inner.split_once('|') {
            None => (inner, false),
            Some((value, filter)) if filter.trim() == "json" => (value.trim(), true),
            Some((_, filter)) => {
                return Err(TemplateError::UnknownFilter {
                    placeholder: inner.to_string(),
                    filter: filter.trim().to_string(),
                });
            }
        };
        if inner == "input.text" {
            pieces.push(Piece::Input(json));
        } else if let Some(path) = inner.strip_prefix("tasks.").filter(|p| !p.is_empty()) {
            pieces.push(Piece::Task(path, json));
        } else {
            return Err(TemplateError::UnknownRoot {
                placeholder: inner.to_string(),
            });
        }
        let consumed = open + 2 + close + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest));
    }
    Ok(pieces)
}

/// Splits `path` into `(task name, field path)` using the longest name for which `is_task`
/// holds and which is followed by the end of the path or a `.`.
fn split_task(path: &str, is_task: impl Fn(&str) -> bool) -> Option<(&str, &str)> {
    if is_task(path) {
        return Some((path, ""));
    }
    // Dots from the right give the longest candidate names first.
    path.rmatch_indices('.')
        .map(|(i, _)| (&path[..i], &path[i + 1..]))
        .find(|(name, _)| is_task(name))
}

/// The raw `tasks.` paths of all placeholders (without the `tasks.` prefix), in order.
pub fn referenced_tasks(template: &str) -> Result<Vec<String>, TemplateError> {
    Ok(parse(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Task(path, _) => Some(path.to_string()),
            _ => None,
        })
        .collect())
}

/// Checks the template's syntax and that every `tasks.` placeholder starts with a name listed
/// in `depends_on`, so a typo fails the task at once instead of blocking it forever.
pub fn check_references(template: &str, depends_on: &[String]) -> Result<(), TemplateError> {
    for piece in parse(template)? {
        if let Piece::Task(path, _) = piece
            && split_task(path, |n| depends_on.iter().any(|d| d == n)).is_none()
        {
            return Err(TemplateError::UnknownTask {
                placeholder: format!("tasks.{path}"),
                known: depends_on.to_vec(),
            });
        }
    }
    Ok(())
}

/// Renders the template. String values are inserted raw, any other JSON value compact.
pub fn render(template: &str, ctx: &TemplateContext) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in parse(template)? {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Input(json) => {
                let text = ctx.input_text.ok_or(TemplateError::InputMissing)?;
                if json {
                    out.push_str(&Value::String(text.to_string()).to_string());
                } else {
                    out.push_str(text);
                }
            }
            Piece::Task(path, json) => match lookup(path, ctx.tasks)? {
                Value::String(s) if !json => out.push_str(s),
                other => out.push_str(&other.to_string()),
            },
        }
    }
    Ok(out)
}

/// Resolves `NAME[.FIELD...]` against the task results.
fn lookup<'v>(path: &str, tasks: &'v BTreeMap<String, Value>) -> Result<&'v Value, TemplateError> {
    let placeholder = || format!("tasks.{path}");
    let (name, fields) =
        split_task(path, |n| tasks.contains_key(n)).ok_or_else(|| TemplateError::UnknownTask {
            placeholder: placeholder(),
            known: tasks.keys().cloned().collect(),
        })?;
    let mut value = tasks.get(name).ok_or_else(|| TemplateError::UnknownTask {
        placeholder: placeholder(),
        known: tasks.keys().cloned().collect(),
    })?;
    if fields.is_empty() {
        return Ok(value);
    }
    let mut walked = Vec::new();
    for segment in fields.split('.') {
        let next = match value {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        walked.push(segment);
        match next {
            Some(v) => value = v,
            None => {
                let available = match value {
                    Value::Object(map) => map.keys().cloned().collect(),
                    Value::Array(items) => (0..items.len()).map(|i| i.to_string()).collect(),
                    _ => Vec::new(),
                };
                return Err(TemplateError::MissingField {
                    placeholder: placeholder(),
                    task: name.to_string(),
                    path: fields.to_string(),
                    missing: walked.join("."),
                    available,
                });
            }
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tasks() -> BTreeMap<String, Value> {
        let mut t = BTreeMap::new();
        t.insert(
            "classify".to_string(),
            json!({"label": "spam", "score": 0.9, "top": [{"label": "a"}, {"label": "b"}]}),
        );
        t.insert("summ".to_string(), json!("short text"));
        t.insert("my.task".to_string(), json!({"x": 1}));
        t.insert("my".to_string(), json!({"task": {"x": 2}}));
        t
    }

    fn r(template: &str) -> Result<String, TemplateError> {
        let t = tasks();
        render(
            template,
            &TemplateContext {
                input_text: Some("hello"),
                tasks: &t,
            },
        )
    }

    #[test]
    fn the_json_filter_encodes_values() {
        assert_eq!(r("{{ input.text | json }}").unwrap(), "\"hello\"");
        assert_eq!(
            r("{\"t\": {{ tasks.summ|json }}}").unwrap(),
            "{\"t\": \"short text\"}"
        );
        assert_eq!(r("{{ tasks.classify.score | json }}").unwrap(), "0.9");
        assert!(matches!(
            r("{{ tasks.summ | upper }}"),
            Err(TemplateError::UnknownFilter { filter, .. }) if filter == "upper"
        ));
    }

    #[test]
    fn renders_input_and_literals() {
        assert_eq!(r("say {{ input.text }}!").unwrap(), "say hello!");
        assert_eq!(r("{{input.text}}{{  input.text  }}").unwrap(), "hellohello");
        assert_eq!(r("no placeholders }} here").unwrap(), "no placeholders }} here");
        assert_eq!(r("").unwrap(), "");
    }

    #[test]
    fn renders_task_results() {
        assert_eq!(r("{{ tasks.summ }}").unwrap(), "short text");
        assert_eq!(r("{{ tasks.classify.label }}").unwrap(), "spam");
        assert_eq!(r("{{ tasks.classify.score }}").unwrap(), "0.9");
        assert_eq!(r("{{ tasks.classify.top.1.label }}").unwrap(), "b");
        assert_eq!(r("{{ tasks.classify.top.0 }}").unwrap(), r#"{"label":"a"}"#);
    }

    #[test]
    fn longest_task_name_wins() {
        assert_eq!(r("{{ tasks.my.task.x }}").unwrap(), "1");
        assert_eq!(r("{{ tasks.my }}").unwrap(), r#"{"task":{"x":2}}"#);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            r("a {{ input.text"),
            Err(TemplateError::Unterminated { offset: 2 })
        );
        assert_eq!(r("ab{{  }}"), Err(TemplateError::Empty { offset: 2 }));
        let err = r("{{ env.HOME }}").unwrap_err();
        assert_eq!(
            err,
            TemplateError::UnknownRoot {
                placeholder: "env.HOME".into()
            }
        );
        assert!(err.to_string().contains("`{{ env.HOME }}`"), "{err}");
        assert!(matches!(
            r("{{ tasks. }}"),
            Err(TemplateError::UnknownRoot { .. })
        ));
        assert!(matches!(r("{{ input }}"), Err(TemplateError::UnknownRoot { .. })));
    }

    #[test]
    fn missing_input() {
        let t = tasks();
        let err = render(
            "{{ input.text }}",
            &TemplateContext {
                input_text: None,
                tasks: &t,
            },
        )
        .unwrap_err();
        assert_eq!(err, TemplateError::InputMissing);
        assert!(err.to_string().contains("input.text"));
    }

    #[test]
    fn unknown_task_lists_known() {
        let err = r("{{ tasks.nope.x }}").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tasks.nope.x"), "{msg}");
        assert!(msg.contains("classify, my, my.task, summ"), "{msg}");
    }

    #[test]
    fn missing_field_names_task_path_and_alternatives() {
        let err = r("{{ tasks.classify.lable }}").unwrap_err();
        assert_eq!(
            err,
            TemplateError::MissingField {
                placeholder: "tasks.classify.lable".into(),
                task: "classify".into(),
                path: "lable".into(),
                missing: "lable".into(),
                available: vec!["label".into(), "score".into(), "top".into()],
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("`classify`") && msg.contains("label, score, top"),
            "{msg}"
        );

        let err = r("{{ tasks.classify.top.5.label }}").unwrap_err();
        assert!(
            matches!(&err, TemplateError::MissingField { missing, available, .. }
                if missing == "top.5" && available == &vec!["0".to_string(), "1".to_string()]),
            "{err:?}"
        );
        let err = r("{{ tasks.summ.x }}").unwrap_err();
        assert!(err.to_string().contains("(none)"), "{err}");
    }

    #[test]
    fn references_and_checks() {
        let tpl = "{{ tasks.a.x }} {{ input.text }} {{ tasks.b.c }} {{ tasks.b }}";
        assert_eq!(referenced_tasks(tpl).unwrap(), vec!["a.x", "b.c", "b"]);
        let deps = vec!["a".to_string(), "b.c".to_string()];
        assert!(check_references("{{ tasks.a.x }} {{ tasks.b.c.d }}", &deps).is_ok());
        let err = check_references("{{ tasks.b.x }}", &deps).unwrap_err();
        assert!(
            matches!(&err, TemplateError::UnknownTask { placeholder, known }
                if placeholder == "tasks.b.x" && known == &deps),
            "{err:?}"
        );
        assert!(err.to_string().contains("a, b.c"));
        assert!(check_references("{{ tasks.a", &deps).is_err());
    }
}
