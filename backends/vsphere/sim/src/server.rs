//! HTTP plumbing: listeners (HTTPS and HTTP), the single dispatcher, sessions, the seed inventory.
//!
//! Contract: every request goes through [`dispatch`], which applies injected 503 bursts and hands
//! `/api/...` to `rest.rs` and `/sdk/vim25/...` to `vim.rs`; anything else is 404.

use crate::exchange::{Reply, Req};
use crate::state::{Disk, DiskBacking, Inventory, Network, NetworkKind, Nic, PowerState, VmConfig};
use crate::{Shared, lock};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;

async fn dispatch(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body_bytes = body.clone();
    let query = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect()
        })
        .unwrap_or_default();
    let is_transfer = uri.path() == "/guestFile";
    let (body, raw_body_invalid) = if body.is_empty() || is_transfer {
        (None, false)
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => (Some(v), false),
            Err(_) => (None, true),
        }
    };
    let req = Req { method, path: uri.path().to_string(), query, headers, body, raw_body_invalid, raw: body_bytes };
    let burst = {
        let mut f = lock(&shared.faults);
        let hit = f.burst_503 > 0;
        f.burst_503 = f.burst_503.saturating_sub(1);
        hit
    };
    if burst {
        lock(&shared.stats).injected_503 += 1;
    }
    let reply = if req.path.starts_with("/api/") {
        crate::rest::handle(&shared, &req, burst)
    } else if req.path.starts_with("/sdk/vim25/") {
        let reply = crate::vim::handle(&shared, &req, burst);
        lock(&shared.vim_answers).push(crate::VimAnswer {
            method: req.method.to_string(),
            path: req.path.clone(),
            status: reply.status,
            body: reply.body.clone(),
            request: req.body.clone(),
        });
        reply
    } else if req.path == "/guestFile" && !burst {
        crate::guest_api::transfer(&shared, &req, &req.raw)
    } else if burst {
        Reply::empty(503)
    } else {
        Reply::empty(404)
    };
    let lose = {
        let mut f = lock(&shared.faults);
        let hit = f.lose_answers.iter().position(|end| req.path.ends_with(end.as_str()));
        hit.map(|i| f.lose_answers.remove(i)).is_some()
    };
    if lose {
        return broken_response();
    }
    to_response(reply)
}

/// A response whose body breaks off after its first bytes: the client sees the connection fail
/// mid-answer (after the request was carried out).
fn broken_response() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::new(BrokenBody { sent: false }))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A body that yields one fragment of JSON, then an I/O error.
struct BrokenBody {
    sent: bool,
}

impl http_body::Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.sent {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("answer lost (injected)"))));
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"{\"_typeName\":")))))
    }
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn to_response(reply: Reply) -> Response {
    let mut builder =
        Response::builder().status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (k, v) in &reply.headers {
        builder = builder.header(*k, v);
    }
    let body = match (reply.body, reply.octets) {
        (Some(v), _) => {
            builder = builder.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        (None, Some(data)) => {
            builder = builder.header("content-type", "application/octet-stream");
            Body::from(data)
        }
        (None, None) => Body::empty(),
    };
    builder.body(body).unwrap_or_else(|_| Response::new(Body::empty()))
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(dispatch).with_state(shared)
}

pub(crate) async fn serve_https(
    shared: Arc<Shared>,
    tls: &crate::tls::GeneratedTls,
) -> Result<(String, axum_server::Handle<std::net::SocketAddr>), String> {
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        tls.server_cert_pem.clone().into_bytes(),
        tls.server_key_pem.clone().into_bytes(),
    )
    .await
    .map_err(|e| format!("TLS config: {e}"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let _ = shared.https_port.set(addr.port());
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config).map_err(|e| e.to_string())?.handle(handle.clone());
    tokio::spawn(server.serve(router(shared).into_make_service()));
    Ok((format!("https://127.0.0.1:{}", addr.port()), handle))
}

pub(crate) async fn serve_http(
    shared: Arc<Shared>,
) -> Result<(String, axum_server::Handle<std::net::SocketAddr>), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp(listener).map_err(|e| e.to_string())?.handle(handle.clone());
    tokio::spawn(server.serve(router(shared).into_make_service()));
    Ok((format!("http://127.0.0.1:{}", addr.port()), handle))
}

fn disk(key: i32, label: &str, gib: u64, file: &str) -> Disk {
    Disk {
        key,
        label: label.to_string(),
        capacity: gib << 30,
        file: file.to_string(),
        parent_file: None,
        backing: DiskBacking::Flat,
        lineage: Vec::new(),
        cbt_epoch: uuid::Uuid::new_v4().to_string(),
        next_seq: 1,
    }
}

/// The default inventory: folders `prod` (group-v10), `stage` (group-v11) and `apps` (group-v12);
/// networks `VM Network` (network-1), `isolated-pg` (network-2, isolated), the distributed port
/// group `dvpg-app` (dvportgroup-21) and the NSX segment `nsx-seg` (network-o31); VMs `web`
/// (vm-101, CBT on) and `db` (vm-102, CBT off, two disks) in `prod`, and `app` (vm-103, in `apps`:
/// flat, sparse and RDM disks, NICs on the distributed port group and the NSX segment). Every VM
/// runs and has a simulated guest.
pub(crate) fn seed(inv: &mut Inventory) {
    inv.folders = vec![
        ("group-v10".into(), "prod".into()),
        ("group-v11".into(), "stage".into()),
        ("group-v12".into(), "apps".into()),
    ];
    inv.networks = vec![
        Network::standard("network-1", "VM Network", false),
        Network::standard("network-2", "isolated-pg", true),
        Network {
            id: "dvportgroup-21".into(),
            name: "dvpg-app".into(),
            isolated: false,
            kind: NetworkKind::Distributed {
                switch_uuid: "50 2a 6b 1c 9e 0f 4d 77-8a 3b 5c 6d 7e 8f 90 a1".into(),
                portgroup_key: "dvportgroup-21".into(),
            },
        },
        Network {
            id: "network-o31".into(),
            name: "nsx-seg".into(),
            isolated: false,
            kind: NetworkKind::Opaque {
                opaque_id: "3a9c1d2e-7f41-4b8a-9c0d-5e6f7a8b9c0d".into(),
                opaque_type: "nsx.LogicalSwitch".into(),
            },
        },
    ];
    let web = VmConfig {
        cpus: 2,
        memory_mib: 2048,
        disks: vec![disk(2000, "Hard disk 1", 16, "[datastore1] web/web.vmdk")],
        nics: vec![Nic {
            key: 4000,
            label: "Network adapter 1".into(),
            mac: "00:50:56:00:01:01".into(),
            network: "network-1".into(),
        }],
        cbt: true,
    };
    let db = VmConfig {
        cpus: 4,
        memory_mib: 8192,
        disks: vec![
            disk(2000, "Hard disk 1", 32, "[datastore1] db/db.vmdk"),
            disk(2001, "Hard disk 2", 64, "[datastore1] db/db_1.vmdk"),
        ],
        nics: vec![Nic {
            key: 4000,
            label: "Network adapter 1".into(),
            mac: "00:50:56:00:01:02".into(),
            network: "network-1".into(),
        }],
        cbt: false,
    };
    let mut sparse = disk(2001, "Hard disk 2", 4, "[datastore1] app/app_1.vmdk");
    sparse.backing = DiskBacking::Sparse;
    let mut rdm = disk(2002, "Hard disk 3", 8, "[datastore1] app/app_rdm.vmdk");
    rdm.backing = DiskBacking::Rdm { lun_uuid: "0200000000600508b1001c3ea9a6b3a8f0e41b8b4d4c4f4749".into() };
    let app = VmConfig {
        cpus: 2,
        memory_mib: 4096,
        disks: vec![disk(2000, "Hard disk 1", 16, "[datastore1] app/app.vmdk"), sparse, rdm],
        nics: vec![
            Nic {
                key: 4000,
                label: "Network adapter 1".into(),
                mac: "00:50:56:00:01:03".into(),
                network: "dvportgroup-21".into(),
            },
            Nic {
                key: 4001,
                label: "Network adapter 2".into(),
                mac: "00:50:56:00:01:04".into(),
                network: "network-o31".into(),
            },
        ],
        cbt: true,
    };
    for (id, name, folder, config) in
        [("vm-101", "web", "group-v10", web), ("vm-102", "db", "group-v10", db), ("vm-103", "app", "group-v12", app)]
    {
        inv.guests.insert(id.to_string(), crate::guest::vsphere_guest(name));
        inv.vms.insert(
            id.into(),
            crate::state::Vm {
                id: id.into(),
                name: name.into(),
                folder: folder.into(),
                config,
                power: PowerState::On,
                bios_uuid: uuid::Uuid::new_v4().to_string(),
                instance_uuid: uuid::Uuid::new_v4().to_string(),
                root_snapshots: Vec::new(),
                current_snapshot: None,
            },
        );
    }
}
