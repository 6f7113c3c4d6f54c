//! Checks a graph against the server's `/object_info` before it is queued, so a
//! client learns which node, which input and which values are allowed, instead of
//! a generic failure later.
//!
//! This is a subset of ComfyUI's own validation (API.md §3.3): unknown classes,
//! missing required inputs, numbers out of range and values not in a list. Links
//! and types are left to the server, whose 400 answer is reported just as clearly.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// What is wrong with one input of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    UnknownClass,
    MissingInput,
    OutOfRange,
    NotInList,
    WrongType,
    /// `params.overrides` set an input the node's class does not declare (ComfyUI
    /// would ignore it silently).
    UnknownInput,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub node: String,
    pub class: String,
    pub input: Option<String>,
    pub kind: ProblemKind,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.input {
            Some(input) => write!(
                f,
                "node {} ({}) input {input}: {}",
                self.node, self.class, self.message
            ),
            None => write!(f, "node {} ({}): {}", self.node, self.class, self.message),
        }
    }
}

/// Whether an input value is a link `[node_id, output_index]` (any JSON array is).
pub fn is_link(v: &Value) -> bool {
    v.is_array()
}

/// The allowed values of a combo input, in either spelling (API.md §13.1):
/// `[[...options], {..}]` or `["COMBO", {"options": [...]}]`.
pub fn combo_options(spec: &Value) -> Option<&Vec<Value>> {
    match spec.get(0)? {
        Value::Array(options) => Some(options),
        Value::String(t) if t == "COMBO" => spec.get(1)?.get("options")?.as_array(),
        _ => None,
    }
}

fn is_upload_picker(spec: &Value) -> bool {
    spec.get(1).and_then(Value::as_object).is_some_and(|o| {
        o.iter()
            .any(|(k, v)| k.ends_with("_upload") && v == &Value::Bool(true))
    })
}

fn input_spec<'a>(info: &'a Value, name: &str) -> Option<&'a Value> {
    let inputs = info.get("input")?;
    inputs
        .get("required")
        .and_then(|r| r.get(name))
        .or_else(|| inputs.get("optional").and_then(|o| o.get(name)))
}

fn list_values(options: &[Value]) -> String {
    let shown: Vec<String> = options
        .iter()
        .take(20)
        .map(|o| {
            o.as_str()
                .map_or_else(|| o.to_string(), |s| format!("{s:?}"))
        })
        .collect();
    let more = options.len().saturating_sub(20);
    match (shown.is_empty(), more) {
        (true, _) => "none are available on this server".into(),
        (false, 0) => format!("allowed: {}", shown.join(", ")),
        (false, n) => format!("allowed: {} and {n} more", shown.join(", ")),
    }
}

/// Checks every node of `graph` against `object_info`.
pub fn check(graph: &Map<String, Value>, object_info: &Map<String, Value>) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (id, node) in graph {
        let Some(class) = node.get("class_type").and_then(Value::as_str) else {
            problems.push(Problem {
                node: id.clone(),
                class: "?".into(),
                input: None,
                kind: ProblemKind::UnknownClass,
                message: "has no class_type".into(),
            });
            continue;
        };
        let Some(info) = object_info.get(class) else {
            problems.push(Problem {
                node: id.clone(),
                class: class.into(),
                input: None,
                kind: ProblemKind::UnknownClass,
                message: format!("node class {class} is not installed on this ComfyUI"),
            });
            continue;
        };
        let empty = Map::new();
        let inputs = node
            .get("inputs")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let problem = |input: &str, kind, message: String| Problem {
            node: id.clone(),
            class: class.into(),
            input: Some(input.into()),
            kind,
            message,
        };
        if let Some(required) = info
            .get("input")
            .and_then(|i| i.get("required"))
            .and_then(Value::as_object)
        {
            for name in required.keys() {
                if !inputs.contains_key(name) {
                    problems.push(problem(
                        name,
                        ProblemKind::MissingInput,
                        "required input is missing".into(),
                    ));
                }
            }
        }
        for (name, value) in inputs {
            if is_link(value) {
                continue;
            }
            let Some(spec) = input_spec(info, name) else {
                continue;
            };
            if let Some(options) = combo_options(spec) {
                // Upload pickers (LoadImage, LoadAudio, ...) list only the top of
                // the input folder; the node validates its file itself, so uploads
                // in subfolders are fine (API.md §6.2).
                if is_upload_picker(spec) {
                    continue;
                }
                if !options.contains(value) {
                    problems.push(problem(
                        name,
                        ProblemKind::NotInList,
                        format!("value {value} is not in the list; {}", list_values(options)),
                    ));
                }
                continue;
            }
            let kind = spec.get(0).and_then(Value::as_str).unwrap_or("");
            if kind != "INT" && kind != "FLOAT" {
                continue;
            }
            let number = value
                .as_f64()
                .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()));
            let Some(number) = number else {
                problems.push(problem(
                    name,
                    ProblemKind::WrongType,
                    format!("value {value} is not a number ({kind})"),
                ));
                continue;
            };
            let opts = spec.get(1);
            let bound = |k: &str| opts.and_then(|o| o.get(k)).and_then(Value::as_f64);
            if let Some(min) = bound("min").filter(|min| number < *min) {
                problems.push(problem(
                    name,
                    ProblemKind::OutOfRange,
                    format!("value {value} is smaller than the minimum {min}"),
                ));
            }
            if let Some(max) = bound("max").filter(|max| number > *max) {
                problems.push(problem(
                    name,
                    ProblemKind::OutOfRange,
                    format!("value {value} is bigger than the maximum {max}"),
                ));
            }
        }
    }
    problems
}

/// The inputs `params.overrides` added to the graph (`added`, as node id and input
/// name) that their node's class does not declare in `object_info`. Classes
/// `object_info` does not know are left to [`check`], which reports them.
pub fn unknown_inputs(
    graph: &Map<String, Value>,
    added: &[(String, String)],
    object_info: &Map<String, Value>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (node, input) in added {
        let Some(class) = graph
            .get(node)
            .and_then(|n| n.get("class_type"))
            .and_then(Value::as_str)
        else {
            continue;
        };
        let Some(info) = object_info.get(class) else {
            continue;
        };
        if input_spec(info, input).is_some() {
            continue;
        }
        let mut declared: Vec<&str> = ["required", "optional"]
            .iter()
            .filter_map(|k| info.get("input")?.get(k)?.as_object())
            .flat_map(|m| m.keys().map(String::as_str))
            .collect();
        declared.sort_unstable();
        problems.push(Problem {
            node: node.clone(),
            class: class.into(),
            input: Some(input.clone()),
            kind: ProblemKind::UnknownInput,
            message: format!(
                "params.overrides.{node}.{input}: {class} has no input {input:?}; its inputs are {}",
                declared.join(", ")
            ),
        });
    }
    problems
}

/// How many output nodes (`output_node: true` in `object_info`) the graph has:
/// each makes at least one output when it runs.
pub fn output_nodes(graph: &Map<String, Value>, object_info: &Map<String, Value>) -> usize {
    graph
        .values()
        .filter(|node| {
            node.get("class_type")
                .and_then(Value::as_str)
                .and_then(|c| object_info.get(c))
                .and_then(|i| i.get("output_node"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .count()
}

/// The node ids ComfyUI will execute: every output node and what it depends on.
pub fn nodes_to_run(
    graph: &Map<String, Value>,
    object_info: &Map<String, Value>,
) -> BTreeSet<String> {
    let is_output = |node: &Value| {
        node.get("class_type")
            .and_then(Value::as_str)
            .and_then(|c| object_info.get(c))
            .and_then(|i| i.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    let mut stack: Vec<&String> = graph
        .iter()
        .filter(|(_, n)| is_output(n))
        .map(|(id, _)| id)
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        let Some(inputs) = graph
            .get(id)
            .and_then(|n| n.get("inputs"))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for v in inputs.values() {
            if let Some(src) = v.get(0).and_then(Value::as_str).filter(|_| is_link(v)) {
                if let Some((key, _)) = graph.get_key_value(src) {
                    stack.push(key);
                }
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info() -> Map<String, Value> {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/comfyui/object_info.json"
        ))
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn graph(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_reference_workflows_pass() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/comfyui/workflows"
        );
        for name in [
            "01_empty_invert_save",
            "04_progress_ws_preview",
            "05_text_getimagesize",
            "06_video_mp4_webp",
        ] {
            let g: Map<String, Value> = serde_json::from_str(
                &std::fs::read_to_string(format!("{dir}/{name}.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(check(&g, &info()), vec![], "{name}");
        }
    }

    #[test]
    fn each_problem_names_node_input_and_allowed_values() {
        let g = graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 99999, "batch_size": 1, "color": 0}},
            "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": "abc", "height": 8}},
        }));
        let problems = check(&g, &info());
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            text.contains(
                &"node 1 (EmptyImage) input width: value 0 is smaller than the minimum 1"
                    .to_string()
            ),
            "{text:#?}"
        );
        assert!(text.iter().any(|t| t.starts_with(
            "node 1 (EmptyImage) input height: value 99999 is bigger than the maximum 16384"
        )));
        assert!(text
            .iter()
            .any(|t| t
                == "node 2 (NoSuchNode): node class NoSuchNode is not installed on this ComfyUI"));
        assert!(text.iter().any(|t| t.contains("node 3 (ImageScale) input upscale_method: value \"bogus\" is not in the list; allowed: \"nearest-exact\", \"bilinear\"")));
        assert!(text
            .iter()
            .any(|t| t.contains("node 3 (ImageScale) input crop: required input is missing")));
        assert!(text
            .iter()
            .any(|t| t.contains("input width: value \"abc\" is not a number (INT)")));
    }

    #[test]
    fn upload_pickers_accept_files_in_subfolders() {
        let g = graph(json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "kiln/photo.png"}},
            "2": {"class_type": "LoadAudio", "inputs": {"audio": "kiln/tone.wav"}},
        }));
        assert_eq!(check(&g, &info()), vec![]);
    }

    #[test]
    fn new_style_combos_are_parsed_too() {
        let g = graph(
            json!({"4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "v", "format": "webm", "codec": "h264"}}}),
        );
        let problems = check(&g, &info());
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].message.contains("allowed: \"auto\", \"mp4\""),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn overridden_inputs_a_node_lacks_are_named_and_outputs_counted() {
        let g = graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0, "colour": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }));
        let added = [
            ("1".to_string(), "colour".to_string()),
            ("1".to_string(), "color".to_string()),
        ];
        let problems = unknown_inputs(&g, &added, &info());
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].to_string();
        assert!(
            text.starts_with("node 1 (EmptyImage) input colour: params.overrides.1.colour")
                && text.contains("batch_size, color, height, width"),
            "{text}"
        );
        assert_eq!(output_nodes(&g, &info()), 2);
    }

    #[test]
    fn only_output_nodes_and_their_inputs_run() {
        let g = graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
            "9": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        }));
        assert_eq!(
            nodes_to_run(&g, &info()),
            ["1", "2", "3"].map(String::from).into()
        );
    }
}
