//! Loads the official vSphere 7.0.3 OpenAPI documents and checks JSON bodies against them.
//!
//! Contract: [`OpenApi::load`] fails loudly when the documents are absent. [`OpenApi::find`] maps an
//! Automation API request (`/api/...`) onto the operation the documents describe (they describe the
//! older `/rest/...` rendering) and [`Operation::check_request`] / [`Operation::check_response`]
//! return every structural violation found.
//!
//! Decision: a small structural validator of our own instead of the `jsonschema` crate. The documents
//! are OpenAPI 3.0 (not JSON Schema), use only `type`, `properties`, `required`, `items`, `enum`,
//! `$ref`, `format`, `uniqueItems` and `additionalProperties`, and 115 of their `$ref`s to
//! `#/components/requestBodies/X` dangle (e.g. `vcenter.VM_clone`); we resolve those to the schema of
//! the same name, which a generic validator would not do. Objects are checked *closed* (a property
//! the document does not list is a violation) unless the schema has `additionalProperties` or no
//! `properties` at all: stricter than JSON Schema, so typos in the simulator or client show up.
//!
//! `/api` vs `/rest` rendering differences handled here (the documents describe `/rest`):
//! - `/rest` wraps results in `{"value": ...}` and arguments in `{"spec": ...}`; `/api` does not, so a
//!   wrapper schema with a single property is unwrapped before checking;
//! - `/rest` renders maps as `[{"key":..,"value":..}]`, `/api` as JSON objects; an object instance
//!   against such a list schema is checked entry by entry;
//! - `/api` answers 201/204 where `/rest` documents 200: any 2xx is checked against the 200 entry;
//! - `/api` query filters drop the `filter.` prefix (`names=` for `filter.names`).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable naming the directory with `vcenter.json` and `cis.json`.
pub const OPENAPI_DIR_ENV: &str = "STAGECORE_VSPHERE_OPENAPI_DIR";

/// The parsed documents, with their path templates pre-split.
pub(crate) struct OpenApi {
    docs: Vec<Value>,
    templates: Vec<Template>,
}

struct Template {
    doc: usize,
    key: String,
    segments: Vec<String>,
    query: Option<String>,
}

/// One documented operation (a path template and a method of one document).
pub(crate) struct Operation<'a> {
    doc: &'a Value,
    op: &'a Value,
    /// The `/rest/...` path template that matched, e.g. `/rest/vcenter/vm/{vm}`.
    pub(crate) template: &'a str,
}

static LOADED: OnceLock<Result<OpenApi, String>> = OnceLock::new();

impl OpenApi {
    /// The documents, loaded once per process; an error names every place that was looked at.
    pub(crate) fn get() -> Result<&'static OpenApi, String> {
        LOADED.get_or_init(OpenApi::load).as_ref().map_err(Clone::clone)
    }

    fn load() -> Result<OpenApi, String> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = std::env::var_os(OPENAPI_DIR_ENV) {
            candidates.push(PathBuf::from(dir));
        }
        // backends/vsphere/sim -> repository root -> its sibling `shared/`.
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../../shared/vsphere-openapi-7.0.3"));
        candidates.push(PathBuf::from("/work/shared/vsphere-openapi-7.0.3"));
        let dir = candidates
            .iter()
            .find(|d| d.join("vcenter.json").is_file() && d.join("cis.json").is_file())
            .ok_or_else(|| {
                format!(
                    "vSphere OpenAPI documents (vcenter.json, cis.json) not found; looked in {:?} \
                     (set {OPENAPI_DIR_ENV})",
                    candidates
                )
            })?;
        let mut docs = Vec::new();
        for name in ["vcenter.json", "cis.json"] {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            docs.push(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?);
        }
        let templates = split_templates(&docs);
        Ok(OpenApi { docs, templates })
    }

    /// Finds the documented operation for a `/rest/...` path (with `?action=..` if any) and method.
    pub(crate) fn find(&self, rest_path: &str, method: &str) -> Option<Operation<'_>> {
        let (path, query) = match rest_path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest_path, None),
        };
        let segments: Vec<&str> = path.split('/').collect();
        let method = method.to_ascii_lowercase();
        self.templates.iter().find_map(|t| {
            let matches = t.query.as_deref() == query
                && t.segments.len() == segments.len()
                && t.segments.iter().zip(&segments).all(|(a, b)| a.starts_with('{') || a == b);
            let doc = &self.docs[t.doc];
            let op = doc["paths"][&t.key].get(&method)?;
            matches.then_some(Operation { doc, op, template: &t.key })
        })
    }
}

fn split_templates(docs: &[Value]) -> Vec<Template> {
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        for key in doc["paths"].as_object().into_iter().flat_map(|m| m.keys()) {
            let (path, query) = match key.split_once('?') {
                Some((p, q)) => (p, Some(q.to_string())),
                None => (key.as_str(), None),
            };
            let segments = path.split('/').map(str::to_string).collect();
            out.push(Template { doc: i, key: key.clone(), segments, query });
        }
    }
    out
}

impl Operation<'_> {
    /// Checks `/api` query parameter names against the documented (`filter.`-prefixed) ones.
    pub(crate) fn check_query(&self, keys: &[String]) -> Vec<String> {
        let documented: Vec<&str> = self.op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str())
            .collect();
        keys.iter()
            .filter(|k| k.as_str() != "action")
            .filter(|k| !documented.contains(&k.as_str()) && !documented.contains(&format!("filter.{k}").as_str()))
            .map(|k| format!("query parameter `{k}` is not documented for {}", self.template))
            .collect()
    }

    /// Checks a request body; `None` means the request had no body.
    pub(crate) fn check_request(&self, body: Option<&Value>) -> Vec<String> {
        let schema = self.op.get("requestBody").map(|rb| {
            let rb = resolve(self.doc, rb);
            rb.pointer("/content/application~1json/schema").unwrap_or(rb)
        });
        let mut errors = Vec::new();
        match (schema, body) {
            (None, None) => {}
            (None, Some(_)) => errors.push("request body sent but none is documented".to_string()),
            (Some(_), None) => errors.push("request body documented but none sent".to_string()),
            (Some(schema), Some(body)) => {
                let schema = unwrap_single(self.doc, schema);
                check(self.doc, schema, body, "", &mut errors);
            }
        }
        errors
    }

    /// Checks a body that carries several operation parameters as members (see
    /// `rest::guest_members`): `credentials` against `VcenterVmGuestCredentials`, any other
    /// member against the documented body schema; no other member is allowed.
    pub(crate) fn check_members(&self, body: Option<&Value>, members: &[&str]) -> Vec<String> {
        let mut errors = Vec::new();
        let Some(obj) = body.and_then(Value::as_object) else {
            return vec!["request body must be an object of the operation's parameters".to_string()];
        };
        let documented = self.op.get("requestBody").map(|rb| {
            let rb = resolve(self.doc, rb);
            rb.pointer("/content/application~1json/schema").unwrap_or(rb)
        });
        for m in members {
            let Some(v) = obj.get(*m) else {
                errors.push(format!("/{m}: required parameter missing"));
                continue;
            };
            let credentials = json_ref("VcenterVmGuestCredentials");
            let schema = if *m == "credentials" { &credentials } else { documented.unwrap_or(&Value::Null) };
            check(self.doc, schema, v, &format!("/{m}"), &mut errors);
        }
        for k in obj.keys().filter(|k| !members.contains(&k.as_str())) {
            errors.push(format!("/{k}: not a parameter of {}", self.template));
        }
        errors
    }

    /// Checks a response status and body (`None` for an empty body).
    pub(crate) fn check_response(&self, status: u16, body: Option<&Value>) -> Vec<String> {
        let exact = status.to_string();
        let key = if (200..300).contains(&status) && self.op["responses"].get(&exact).is_none() {
            "200".to_string()
        } else {
            exact
        };
        let Some(resp) = self.op["responses"].get(&key) else {
            return vec![format!("status {status} is not documented for {}", self.template)];
        };
        let resp = resolve(self.doc, resp);
        let schema = resp.pointer("/content/application~1json/schema");
        let mut errors = Vec::new();
        match (schema, body) {
            (None, None) => {}
            (None, Some(_)) => errors.push(format!("status {status}: body sent but none is documented")),
            (Some(_), None) => errors.push(format!("status {status}: body documented but none sent")),
            (Some(schema), Some(body)) => {
                let schema = if (200..300).contains(&status) {
                    unwrap_single(self.doc, schema)
                } else {
                    resolve(self.doc, schema)
                };
                check(self.doc, schema, body, "", &mut errors);
            }
        }
        errors
    }
}

fn json_ref(name: &str) -> Value {
    serde_json::json!({"$ref": format!("#/components/schemas/{name}")})
}

/// Follows `$ref`s; a dangling `requestBodies/X` falls back to `schemas/X` (see module docs).
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(r) = schema.get("$ref").and_then(Value::as_str) else { return schema };
        let Some(name) = r.strip_prefix("#/components/") else { return schema };
        let (section, name) = name.split_once('/').unwrap_or((name, ""));
        schema = doc["components"][section]
            .get(name)
            .or_else(|| doc["components"]["schemas"].get(name))
            .unwrap_or(&Value::Null);
    }
    schema
}

/// `{"value": X}` / `{"spec": X}` wrappers of the `/rest` rendering → `X`.
fn unwrap_single<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    let schema = resolve(doc, schema);
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) if props.len() == 1 => resolve(doc, props.values().next().unwrap_or(&Value::Null)),
        _ => schema,
    }
}

fn check(doc: &Value, schema: &Value, v: &Value, ptr: &str, out: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if schema.is_null() {
        out.push(format!("{ptr}: schema reference does not resolve"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        out.push(format!("{ptr}: {v} is not one of the documented values"));
    }
    let ok = match schema.get("type").and_then(Value::as_str) {
        Some("object") => return check_object(doc, schema, v, ptr, out),
        Some("array") => return check_array(doc, schema, v, ptr, out),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        _ => true,
    };
    if !ok {
        out.push(format!("{ptr}: expected {}, got {v}", schema["type"]));
    }
}

fn check_object(doc: &Value, schema: &Value, v: &Value, ptr: &str, out: &mut Vec<String>) {
    let Some(obj) = v.as_object() else {
        out.push(format!("{ptr}: expected object, got {v}"));
        return;
    };
    for req in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        if !obj.contains_key(req) {
            out.push(format!("{ptr}: required property `{req}` missing"));
        }
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let extra = schema.get("additionalProperties");
    for (k, val) in obj {
        let p = format!("{ptr}/{k}");
        match (props.and_then(|m| m.get(k)), extra) {
            (Some(s), _) => check(doc, s, val, &p, out),
            (None, Some(s)) if s.is_object() => check(doc, s, val, &p, out),
            (None, Some(_)) => {}
            (None, None) if props.is_some() => out.push(format!("{p}: property is not documented")),
            (None, None) => {}
        }
    }
}

fn check_array(doc: &Value, schema: &Value, v: &Value, ptr: &str, out: &mut Vec<String>) {
    let items = resolve(doc, &schema["items"]);
    if let (Some(map), Some(props)) = (v.as_object(), items.get("properties").and_then(Value::as_object)) {
        // `/api` renders `[{key, value}]` maps as JSON objects.
        if props.len() == 2 && props.contains_key("key") && props.contains_key("value") {
            for (k, val) in map {
                check(doc, &props["value"], val, &format!("{ptr}/{k}"), out);
            }
            return;
        }
    }
    let Some(arr) = v.as_array() else {
        out.push(format!("{ptr}: expected array, got {v}"));
        return;
    };
    for (i, item) in arr.iter().enumerate() {
        check(doc, items, item, &format!("{ptr}/{i}"), out);
    }
    if schema["uniqueItems"] == true {
        for (i, a) in arr.iter().enumerate() {
            if arr[..i].contains(a) {
                out.push(format!("{ptr}/{i}: duplicate item in a unique array"));
            }
        }
    }
}
