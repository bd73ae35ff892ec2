//! The Automation REST API subset (`/api/...`), checked against the OpenAPI documents.
//!
//! Contract: [`handle`] maps the `/api` path onto the documented `/rest` operation, checks the
//! request (query names, body), produces the reply, checks the reply (status, body) and turns any
//! violation into a recorded 500. Endpoints served: `POST/DELETE /api/session`,
//! `GET /api/vcenter/vm` (`names`, `folders`, `vms`), `GET/DELETE /api/vcenter/vm/{vm}`,
//! `POST /api/vcenter/vm/{vm}/power?action=start|stop`, `POST /api/vcenter/vm?action=clone`,
//! `GET /api/vcenter/network` (`names`), `GET /api/vcenter/folder` (`names`, `type`).
//! All are described by the documents, so all are checked.

use crate::exchange::{Reply, Req, authenticated, end_session, error, new_session};
use crate::state::PowerState;
use crate::{SIM_PASSWORD, SIM_USER, Shared, Violation, lock};
use axum::http::Method;
use base64::Engine;
use serde_json::{Value, json};
use std::sync::Arc;

/// The `/rest` rendering of an `/api` path.
fn rest_path(req: &Req) -> String {
    let action = req.query("action").first().map(|a| a.to_string());
    let path = req.path.trim_start_matches("/api");
    if path == "/session" {
        return "/rest/com/vmware/cis/session".to_string();
    }
    let segs: Vec<&str> = path.split('/').collect();
    if segs.len() == 5
        && segs[4] == "power"
        && let Some(a) = &action
    {
        return format!("/rest{path}/{a}");
    }
    match action {
        Some(a) => format!("/rest{path}?action={a}"),
        None => format!("/rest{path}"),
    }
}

/// Guest operations carry two parameters in one body (`credentials` and `spec`); the 7.0.3
/// document renders only one of them as the body schema (the other is lost), so each member is
/// checked against its own schema: `credentials` against `VcenterVmGuestCredentials`, `spec`
/// against the documented body.
fn guest_members(req: &Req) -> Option<&'static [&'static str]> {
    if !req.path.contains("/guest/") {
        return None;
    }
    let action = req.query("action").first().copied();
    match (req.path.ends_with("/processes") || req.path.ends_with("/filesystem"), action) {
        (true, Some("create")) => Some(&["credentials", "spec"]),
        (_, Some("get" | "list")) => Some(&["credentials"]),
        _ => None,
    }
}

pub(crate) fn handle(shared: &Arc<Shared>, req: &Req, burst: bool) -> Reply {
    let rest = rest_path(req);
    let api = match req.query("action").first() {
        Some(a) => format!("{}?action={a}", req.path),
        None => req.path.clone(),
    };
    let documented = if req.path.contains("/guest/") {
        shared.openapi.find(&api, req.method.as_str())
    } else {
        shared.openapi.find(&rest, req.method.as_str())
    };
    let Some(op) = documented else {
        note(shared, &mut lock(&shared.stats).unchecked_endpoints, format!("{} {}", req.method, req.path));
        return route(shared, req, burst);
    };
    note(shared, &mut lock(&shared.stats).checked_endpoints, format!("{} {}", req.method, op.template));
    let mut errors = op.check_query(&req.query.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
    if req.raw_body_invalid {
        errors.push("request body is not JSON".to_string());
    }
    match guest_members(req) {
        Some(members) => errors.extend(op.check_members(req.body.as_ref(), members)),
        None => errors.extend(op.check_request(req.body.as_ref())),
    }
    if !errors.is_empty() {
        return violation(shared, req, "request", errors);
    }
    let reply = route(shared, req, burst);
    let errors = op.check_response(reply.status, reply.body.as_ref());
    if !errors.is_empty() {
        return violation(shared, req, "response", errors);
    }
    reply
}

fn note(_shared: &Shared, list: &mut Vec<String>, entry: String) {
    if !list.contains(&entry) {
        list.push(entry);
    }
}

fn violation(shared: &Shared, req: &Req, direction: &'static str, details: Vec<String>) -> Reply {
    let v = Violation { method: req.method.to_string(), path: req.full_path(), direction, details };
    tracing::error!(?v, "OpenAPI violation");
    lock(&shared.violations).push(v.clone());
    Reply::json(500, json!({"openapi_violation": v.details, "direction": direction}))
}

fn route(shared: &Arc<Shared>, req: &Req, burst: bool) -> Reply {
    if burst {
        return error(503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable (injected).");
    }
    let segs: Vec<&str> = req.path.trim_start_matches("/api/").split('/').collect();
    if segs == ["session"] {
        return session(shared, req);
    }
    if segs == ["vcenter", "system"] && req.method == Method::POST && req.query("action").first() == Some(&"hello") {
        return hello(shared, req);
    }
    if !authenticated(shared, req, false) {
        return error(401, "UNAUTHENTICATED", "Authentication required.");
    }
    let action = req.query("action").first().copied();
    match (&req.method, segs.as_slice(), action) {
        (&Method::GET, ["vcenter", "vm"], None) => list_vms(shared, req),
        (&Method::POST, ["vcenter", "vm"], Some("clone")) => clone(shared, req),
        (&Method::GET, ["vcenter", "vm", vm], None) => get_vm(shared, vm),
        (&Method::DELETE, ["vcenter", "vm", vm], None) => delete_vm(shared, vm),
        (&Method::POST, ["vcenter", "vm", vm, "power"], Some(a)) => power(shared, vm, a),
        (&Method::GET, ["vcenter", "network"], None) => list_networks(shared, req),
        (&Method::GET, ["vcenter", "folder"], None) => list_folders(shared, req),
        (&Method::POST, ["vcenter", "vm", vm, "guest", rest @ ..], a) => {
            crate::guest_api::handle_rest(shared, req, vm, rest, a)
        }
        _ => error(404, "NOT_FOUND", format!("no such operation {} {}", req.method, req.path)),
    }
}

/// `POST /api/vcenter/system?action=hello` (vSphere 8.0U1+, not in the 7.0.3 documents): the
/// client names the VI/JSON releases it speaks, the server answers the newest one it serves
/// (`""` when none). Anonymous, as the API allows. A 7.0.x server (no VI/JSON) answers 404.
fn hello(shared: &Shared, req: &Req) -> Reply {
    if shared.vim_release.is_none() {
        return error(404, "NOT_FOUND", "no such operation POST /api/vcenter/system?action=hello");
    }
    let body = req.body.clone().unwrap_or(Value::Null);
    let Some(offered) = body["api_releases"].as_array().filter(|a| a.iter().all(Value::is_string)) else {
        return error(400, "INVALID_ARGUMENT", "api_releases must be a list of strings");
    };
    let mut best: Option<&str> = None;
    for r in offered.iter().filter_map(Value::as_str).filter(|r| shared.serves(r)) {
        if best.is_none_or(|b| crate::release_key(r) > crate::release_key(b)) {
            best = Some(r);
        }
    }
    Reply::json(200, json!({"api_release": best.unwrap_or("")}))
}

fn session(shared: &Shared, req: &Req) -> Reply {
    match req.method {
        Method::POST => {
            let expected = base64::engine::general_purpose::STANDARD.encode(format!("{SIM_USER}:{SIM_PASSWORD}"));
            let given =
                req.headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic "));
            if lock(&shared.faults).reject_logins || given != Some(expected.as_str()) {
                return error(401, "UNAUTHENTICATED", "Authentication failed: invalid user name or password.");
            }
            lock(&shared.stats).rest_logins += 1;
            Reply::json(201, json!(new_session(shared, false)))
        }
        Method::DELETE => {
            if !authenticated(shared, req, false) {
                return error(401, "UNAUTHENTICATED", "Authentication required.");
            }
            end_session(shared, req);
            lock(&shared.stats).rest_logouts += 1;
            Reply::empty(204)
        }
        _ => error(404, "NOT_FOUND", "no such operation"),
    }
}

fn list_vms(shared: &Shared, req: &Req) -> Reply {
    let (names, folders, ids) = (req.query("names"), req.query("folders"), req.query("vms"));
    let inv = lock(&shared.inv);
    let list: Vec<Value> = inv
        .vms
        .values()
        .filter(|v| names.is_empty() || names.contains(&v.name.as_str()))
        .filter(|v| folders.is_empty() || folders.contains(&v.folder.as_str()))
        .filter(|v| ids.is_empty() || ids.contains(&v.id.as_str()))
        .map(|v| {
            json!({"vm": v.id, "name": v.name, "power_state": v.power.rest(),
                   "cpu_count": v.config.cpus, "memory_size_MiB": v.config.memory_mib})
        })
        .collect();
    Reply::json(200, Value::Array(list))
}

fn get_vm(shared: &Shared, id: &str) -> Reply {
    let inv = lock(&shared.inv);
    let Some(vm) = inv.vms.get(id) else {
        return error(404, "NOT_FOUND", format!("VM {id} not found."));
    };
    let mut disks = serde_json::Map::new();
    for (i, d) in vm.config.disks.iter().enumerate() {
        disks.insert(
            d.key.to_string(),
            json!({"label": d.label, "type": "SCSI", "scsi": {"bus": 0, "unit": i},
                   "backing": {"type": "VMDK_FILE", "vmdk_file": d.file}, "capacity": d.capacity}),
        );
    }
    let mut nics = serde_json::Map::new();
    for n in &vm.config.nics {
        let net = inv.network_by_id(&n.network);
        let mut backing = json!({"type": net.map_or("STANDARD_PORTGROUP", |x| x.rest_type()), "network": n.network,
                                  "network_name": net.map(|n| n.name.clone()).unwrap_or_default()});
        match net.map(|x| &x.kind) {
            Some(crate::state::NetworkKind::Distributed { switch_uuid, .. }) => {
                backing["distributed_switch_uuid"] = json!(switch_uuid);
                backing["distributed_port"] = json!(format!("{}", n.key - 3900));
                backing["connection_cookie"] = json!(n.key * 7 + 11);
            }
            Some(crate::state::NetworkKind::Opaque { opaque_id, opaque_type }) => {
                backing["opaque_network_type"] = json!(opaque_type);
                backing["opaque_network_id"] = json!(opaque_id);
            }
            _ => {}
        }
        nics.insert(
            n.key.to_string(),
            json!({"label": n.label, "type": "VMXNET3", "upt_compatibility_enabled": false, "mac_type": "GENERATED",
                   "mac_address": n.mac, "pci_slot_number": 192, "wake_on_lan_enabled": false,
                   "backing": backing,
                   "state": if vm.power == PowerState::On { "CONNECTED" } else { "NOT_CONNECTED" },
                   "start_connected": true, "allow_guest_control": true}),
        );
    }
    Reply::json(
        200,
        json!({
            "guest_OS": "DEBIAN_11_64", "name": vm.name, "power_state": vm.power.rest(),
            "identity": {"name": vm.name, "bios_uuid": vm.bios_uuid, "instance_uuid": vm.instance_uuid},
            "instant_clone_frozen": false,
            "hardware": {"version": "VMX_19", "upgrade_policy": "NEVER", "upgrade_status": "NONE"},
            "boot": {"type": "BIOS", "delay": 0, "retry": false, "retry_delay": 10000, "enter_setup_mode": false},
            "boot_devices": [],
            "cpu": {"count": vm.config.cpus, "cores_per_socket": 1, "hot_add_enabled": false, "hot_remove_enabled": false},
            "memory": {"size_MiB": vm.config.memory_mib, "hot_add_enabled": false},
            "disks": disks, "nics": nics, "cdroms": {}, "floppies": {}, "parallel_ports": {},
            "serial_ports": {}, "sata_adapters": {}, "scsi_adapters": {}, "nvme_adapters": {},
        }),
    )
}

fn delete_vm(shared: &Shared, id: &str) -> Reply {
    let mut inv = lock(&shared.inv);
    match inv.vms.get(id) {
        None => error(404, "NOT_FOUND", format!("VM {id} not found.")),
        Some(vm) if vm.power == PowerState::On => {
            error(400, "NOT_ALLOWED_IN_CURRENT_STATE", format!("VM {id} is powered on."))
        }
        Some(_) => {
            inv.vms.remove(id);
            inv.guests.remove(id);
            inv.processes.remove(id);
            inv.snapshots.retain(|_, s| s.vm != id);
            Reply::empty(204)
        }
    }
}

fn power(shared: &Shared, id: &str, action: &str) -> Reply {
    let mut inv = lock(&shared.inv);
    let Some(vm) = inv.vms.get_mut(id) else {
        return error(404, "NOT_FOUND", format!("VM {id} not found."));
    };
    let target = match action {
        "start" => PowerState::On,
        "stop" => PowerState::Off,
        _ => return error(400, "INVALID_ARGUMENT", format!("unsupported power action {action}")),
    };
    if vm.power == target {
        return error(400, "ALREADY_IN_DESIRED_STATE", format!("VM {id} is already {}.", target.rest()));
    }
    vm.power = target;
    if target == PowerState::On
        && let Some(g) = inv.guests.get_mut(id)
    {
        g.boot();
    }
    Reply::empty(204)
}

fn clone(shared: &Shared, req: &Req) -> Reply {
    let body = req.body.clone().unwrap_or(Value::Null);
    let (Some(source), Some(name)) = (body["source"].as_str(), body["name"].as_str()) else {
        return error(400, "INVALID_ARGUMENT", "spec.source and spec.name are required");
    };
    let mut inv = lock(&shared.inv);
    let Some(src) = inv.vms.get(source).cloned() else {
        return error(404, "NOT_FOUND", format!("VM {source} not found."));
    };
    let folder = body["placement"]["folder"].as_str().unwrap_or(&src.folder).to_string();
    if !inv.folders.iter().any(|(f, _)| *f == folder) {
        return error(404, "NOT_FOUND", format!("Folder {folder} not found."));
    }
    if inv.name_taken(&folder, name) {
        return error(400, "ALREADY_EXISTS", format!("A VM named {name} already exists in {folder}."));
    }
    let guest = inv.guests.get(source).cloned();
    let id = inv.create_vm(name, &folder, src.config.clone(), false, guest);
    if body["power_on"] == true
        && let Some(vm) = inv.vms.get_mut(&id)
    {
        vm.power = PowerState::On;
    }
    Reply::json(200, json!(id))
}

fn list_networks(shared: &Shared, req: &Req) -> Reply {
    let names = req.query("names");
    let inv = lock(&shared.inv);
    let list: Vec<Value> = inv
        .networks
        .iter()
        .filter(|n| names.is_empty() || names.contains(&n.name.as_str()))
        .map(|n| json!({"network": n.id, "name": n.name, "type": n.rest_type()}))
        .collect();
    Reply::json(200, Value::Array(list))
}

fn list_folders(shared: &Shared, req: &Req) -> Reply {
    let names = req.query("names");
    let inv = lock(&shared.inv);
    let list: Vec<Value> = inv
        .folders
        .iter()
        .filter(|(_, n)| names.is_empty() || names.contains(&n.as_str()))
        .map(|(id, n)| json!({"folder": id, "name": n, "type": "VIRTUAL_MACHINE"}))
        .collect();
    Reply::json(200, Value::Array(list))
}
