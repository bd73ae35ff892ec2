//! The guest operations endpoints of the Automation API (`/api/vcenter/vm/{vm}/guest/processes`
//! and `/guest/filesystem?action=create` transfers) over the simulated guests of [`crate::guest`].

use std::collections::BTreeMap;

use crate::exchange::{Reply, Req, error};
use crate::guest::{PRODUCT_UUID, SIM_GUEST_PASSWORD, SIM_GUEST_USER, Transfer};
use crate::state::PowerState;
use crate::{Shared, lock};
use serde_json::{Value, json};

/// Checks `credentials` (wrong user or password → 401, as the API documents).
fn credentials(body: &Value) -> Result<(), Reply> {
    let c = &body["credentials"];
    if c["type"] != "USERNAME_PASSWORD" {
        return Err(error(400, "INVALID_ARGUMENT", "credentials.type must be USERNAME_PASSWORD"));
    }
    if c["user_name"] != SIM_GUEST_USER || c["password"] != SIM_GUEST_PASSWORD {
        return Err(error(
            401,
            "UNAUTHENTICATED",
            "Failed to authenticate with the guest operating system using the supplied credentials.",
        ));
    }
    Ok(())
}

/// `POST /api/vcenter/vm/{vm}/guest/processes?action=create|list`,
/// `POST .../guest/processes/{pid}?action=get`, `POST .../guest/filesystem?action=create`.
pub(crate) fn handle_rest(shared: &Shared, req: &Req, vm: &str, rest: &[&str], action: Option<&str>) -> Reply {
    let body = req.body.clone().unwrap_or(Value::Null);
    let mut guard = lock(&shared.inv);
    let inv = &mut *guard;
    let Some(power) = inv.vms.get(vm).map(|v| v.power) else {
        return error(404, "NOT_FOUND", format!("VM {vm} not found."));
    };
    if power != PowerState::On || !inv.guests.get(vm).is_some_and(|g| g.agent) {
        return error(503, "SERVICE_UNAVAILABLE", format!("VMware Tools is not running in the guest of {vm}."));
    }
    if let Err(r) = credentials(&body) {
        return r;
    }
    let bios_uuid = inv.vms.get(vm).map(|v| v.bios_uuid.clone()).unwrap_or_default();
    let (Some(guest), procs) = (inv.guests.get_mut(vm), inv.processes.entry(vm.to_string()).or_default()) else {
        return error(503, "SERVICE_UNAVAILABLE", "VMware Tools is not running.");
    };
    guest.files.insert(PRODUCT_UUID.into(), (format!("{bios_uuid}\n").into_bytes(), 0o444));
    procs.settle();
    match (rest, action) {
        (["processes"], Some("create")) => {
            let spec = &body["spec"];
            let Some(path) = spec["path"].as_str() else {
                return error(400, "INVALID_ARGUMENT", "spec.path is required");
            };
            if !path.starts_with('/') {
                return error(400, "INVALID_ARGUMENT", "spec.path must be absolute");
            }
            let env: BTreeMap<String, String> = spec["environment_variables"]
                .as_object()
                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                .unwrap_or_default();
            let pid = procs.start(guest, path, spec["arguments"].as_str().unwrap_or(""), &env);
            Reply::json(201, json!(pid))
        }
        (["processes"], Some("list")) => {
            let list: Vec<Value> = procs
                .by_pid
                .values()
                .filter(|p| p.finished.is_none())
                .map(|p| json!({"name": p.name, "pid": p.pid, "owner": SIM_GUEST_USER, "command": p.command, "started": p.started}))
                .collect();
            Reply::json(200, Value::Array(list))
        }
        (["processes", pid], Some("get")) => {
            let Some(p) = pid.parse::<u64>().ok().and_then(|pid| procs.by_pid.get(&pid)) else {
                return error(404, "NOT_FOUND", format!("process {pid} not found in the guest of {vm}"));
            };
            let mut info = json!({"name": p.name, "owner": SIM_GUEST_USER, "command": p.command, "started": p.started});
            if let Some(f) = &p.finished {
                info["finished"] = json!(f);
                info["exit_code"] = json!(p.exit_code);
            }
            Reply::json(200, info)
        }
        (["filesystem"], Some("create")) => {
            let spec = &body["spec"];
            let Some(path) = spec["path"].as_str().filter(|p| p.starts_with('/')) else {
                return error(400, "INVALID_ARGUMENT", "spec.path must be an absolute path");
            };
            let upload = match spec.get("attributes") {
                None | Some(Value::Null) => {
                    if !guest.files.contains_key(path) {
                        return error(404, "NOT_FOUND", format!("file {path} not found in the guest of {vm}"));
                    }
                    None
                }
                Some(a) => {
                    let Some(size) = a["size"].as_u64() else {
                        return error(400, "INVALID_ARGUMENT", "spec.attributes.size is required");
                    };
                    let overwrite = a["overwrite"].as_bool().unwrap_or(false);
                    if !overwrite && guest.files.contains_key(path) {
                        return error(400, "ALREADY_EXISTS", format!("file {path} exists in the guest"));
                    }
                    let mode = match a["posix"]["permissions"].as_str() {
                        None => None,
                        Some(p) => match u32::from_str_radix(p, 8) {
                            Ok(m) if m <= 0o7777 => Some(m),
                            _ => {
                                return error(400, "INVALID_ARGUMENT", format!("posix.permissions `{p}` is not octal"));
                            }
                        },
                    };
                    Some((size, overwrite, mode))
                }
            };
            drop(guard);
            let token = uuid::Uuid::new_v4().simple().to_string();
            lock(&shared.transfers)
                .insert(token.clone(), Transfer { vm: vm.to_string(), path: path.to_string(), upload });
            let host = req.headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
            let scheme = if crate::exchange::is_https(shared, host) { "https" } else { "http" };
            Reply::json(201, json!(format!("{scheme}://{host}/guestFile?id=1&token={token}")))
        }
        _ => error(404, "NOT_FOUND", format!("no such operation {} {}", req.method, req.path)),
    }
}

/// `PUT|GET /guestFile?token=..`: the transfer itself (no session: the token is the authority).
pub(crate) fn transfer(shared: &Shared, req: &Req, raw: &[u8]) -> Reply {
    let token = req.query("token").first().map(|t| t.to_string()).unwrap_or_default();
    let Some(t) = lock(&shared.transfers).remove(&token) else {
        return Reply::empty(404);
    };
    let mut inv = lock(&shared.inv);
    let Some(guest) = inv.guests.get_mut(&t.vm) else { return Reply::empty(404) };
    match (req.method.as_str(), t.upload) {
        ("PUT", Some((size, overwrite, mode))) => {
            if raw.len() as u64 != size {
                return Reply::empty(400);
            }
            if !overwrite && guest.files.contains_key(&t.path) {
                return Reply::empty(409);
            }
            let mode = mode.or_else(|| guest.files.get(&t.path).map(|(_, m)| *m)).unwrap_or(0o644);
            guest.files.insert(t.path, (raw.to_vec(), mode));
            Reply::empty(200)
        }
        ("GET", None) => match guest.files.get(&t.path) {
            Some((c, _)) => Reply::bytes(200, c.clone()),
            None => Reply::empty(404),
        },
        _ => Reply::empty(405),
    }
}
