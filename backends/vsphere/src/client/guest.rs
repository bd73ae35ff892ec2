//! Guest operations of the Automation REST API (VMware Tools in the guest):
//! `POST /api/vcenter/vm/{vm}/guest/processes?action=create|list`,
//! `POST .../guest/processes/{pid}?action=get|delete`, and file transfers
//! (`POST .../guest/filesystem?action=create` returns a one-use URL, then `PUT` or `GET` it).
//!
//! Contract: every call carries the guest credentials in its body (`credentials`,
//! `USERNAME_PASSWORD`); the password is a [`Secret`] exposed only into that body, never logged
//! and never in errors. Wrong guest credentials are `Error::Unauthenticated` (HTTP 401). The
//! transfer URL is used without the vCenter session header (its token is the authority); a `*`
//! host in it (an ESXi host vCenter cannot name) is replaced by the vCenter host.
//! Docs: `vcenter.json` 7.0.3 (`/api/vcenter/vm/{vm}/guest/...`), which the simulator checks.

use super::rest::check_id;
use super::{Api, VsphereClient, error};
use reqwest::Method;
use serde_json::{Value, json};
use stagecore::{Error, Result, Secret};
use std::collections::BTreeMap;
use tracing::Instrument;

/// A process as `processes/{pid}?action=get` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestProcess {
    /// Program name.
    pub name: String,
    /// Command line.
    pub command: String,
    /// Owner.
    pub owner: String,
    /// Exit code, once it finished.
    pub exit_code: Option<i64>,
}

/// A running process as `processes?action=list` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestProcessSummary {
    /// Process id.
    pub pid: u64,
    /// Program name.
    pub name: String,
    /// Command line.
    pub command: String,
}

fn credentials(user: &str, password: &Secret) -> Value {
    json!({"interactive_session": false, "type": "USERNAME_PASSWORD", "user_name": user, "password": password.expose()})
}

impl VsphereClient {
    /// Starts `path` with `arguments` in the guest; returns the pid.
    pub async fn guest_process_create(
        &self,
        vm: &str,
        user: &str,
        password: &Secret,
        path: &str,
        arguments: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<u64> {
        check_id("vm", vm)?;
        let mut spec = json!({"path": path, "arguments": arguments});
        if !env.is_empty() {
            spec["environment_variables"] = json!(env);
        }
        let body = json!({"credentials": credentials(user, password), "spec": spec});
        let p = format!("/api/vcenter/vm/{vm}/guest/processes");
        let context = format!("start a guest process in VM {vm}");
        let v = self.call(Api::Rest, Method::POST, &p, &[("action", "create".into())], Some(&body), &context).await?;
        v.as_u64().ok_or_else(|| error::malformed(&context, "process create did not answer a pid"))
    }

    /// One process (`processes/{pid}?action=get`).
    pub async fn guest_process_get(&self, vm: &str, user: &str, password: &Secret, pid: u64) -> Result<GuestProcess> {
        check_id("vm", vm)?;
        let body = json!({"credentials": credentials(user, password)});
        let p = format!("/api/vcenter/vm/{vm}/guest/processes/{pid}");
        let context = format!("guest process {pid} in VM {vm}");
        let v = self.call(Api::Rest, Method::POST, &p, &[("action", "get".into())], Some(&body), &context).await?;
        Ok(GuestProcess {
            name: v["name"].as_str().unwrap_or_default().to_string(),
            command: v["command"].as_str().unwrap_or_default().to_string(),
            owner: v["owner"].as_str().unwrap_or_default().to_string(),
            exit_code: v["exit_code"].as_i64(),
        })
    }

    /// The guest's running processes (`processes?action=list`).
    pub async fn guest_process_list(
        &self,
        vm: &str,
        user: &str,
        password: &Secret,
    ) -> Result<Vec<GuestProcessSummary>> {
        check_id("vm", vm)?;
        let body = json!({"credentials": credentials(user, password)});
        let p = format!("/api/vcenter/vm/{vm}/guest/processes");
        let context = format!("list guest processes in VM {vm}");
        let v = self.call(Api::Rest, Method::POST, &p, &[("action", "list".into())], Some(&body), &context).await?;
        let list = v.as_array().ok_or_else(|| error::malformed(&context, "process list is not an array"))?;
        Ok(list
            .iter()
            .map(|p| GuestProcessSummary {
                pid: p["pid"].as_u64().unwrap_or_default(),
                name: p["name"].as_str().unwrap_or_default().to_string(),
                command: p["command"].as_str().unwrap_or_default().to_string(),
            })
            .collect())
    }

    /// Uploads a whole file into the guest (`filesystem?action=create` with attributes, then PUT).
    pub async fn guest_upload(
        &self,
        vm: &str,
        user: &str,
        password: &Secret,
        path: &str,
        content: &[u8],
        mode: Option<u32>,
    ) -> Result<()> {
        let mut attributes = json!({"size": content.len(), "overwrite": true});
        if let Some(m) = mode {
            attributes["posix"] = json!({"permissions": format!("{m:o}")});
        }
        let url = self.transfer_url(vm, user, password, path, Some(attributes)).await?;
        self.transfer(Method::PUT, &url, Some(content.to_vec()), path).await.map(|_| ())
    }

    /// Downloads a whole file from the guest (`filesystem?action=create` without attributes, then GET).
    pub async fn guest_download(&self, vm: &str, user: &str, password: &Secret, path: &str) -> Result<Vec<u8>> {
        let url = self.transfer_url(vm, user, password, path, None).await?;
        self.transfer(Method::GET, &url, None, path).await
    }

    async fn transfer_url(
        &self,
        vm: &str,
        user: &str,
        password: &Secret,
        path: &str,
        attributes: Option<Value>,
    ) -> Result<String> {
        check_id("vm", vm)?;
        if !path.starts_with('/') {
            return Err(Error::invalid("guest.path", format!("`{path}` is not absolute")));
        }
        let mut spec = json!({"path": path});
        if let Some(a) = attributes {
            spec["attributes"] = a;
        }
        let body = json!({"credentials": credentials(user, password), "spec": spec});
        let p = format!("/api/vcenter/vm/{vm}/guest/filesystem");
        let context = format!("guest file transfer of {path} in VM {vm}");
        let v = self.call(Api::Rest, Method::POST, &p, &[("action", "create".into())], Some(&body), &context).await?;
        v.as_str().map(str::to_string).ok_or_else(|| error::malformed(&context, "transfer create did not answer a URL"))
    }

    /// PUT or GET a transfer URL (one attempt: the URL is valid for one request).
    async fn transfer(&self, method: Method, url: &str, body: Option<Vec<u8>>, path: &str) -> Result<Vec<u8>> {
        let context = format!("guest file transfer of {path}");
        let mut url = url::Url::parse(url).map_err(|e| error::malformed(&context, format!("bad transfer URL: {e}")))?;
        if url.host_str() == Some("*") {
            let host = self.config.base_url.host_str().unwrap_or("localhost").to_string();
            url.set_host(Some(&host)).map_err(|e| error::malformed(&context, format!("bad transfer URL: {e}")))?;
        }
        let span = tracing::debug_span!("vsphere.guest_transfer", method = %method, path = %path);
        async {
            let mut req = self.http.request(method, url).timeout(self.config.deadline);
            if let Some(b) = body {
                req = req.body(b);
            }
            let resp = req.send().await.map_err(|e| error::transport(&e, &self.endpoint, &context).0)?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.map_err(|e| error::transport(&e, &self.endpoint, &context).0)?;
            match status {
                200..=299 => Ok(bytes.to_vec()),
                404 => Err(Error::not_found("guest file", path)),
                _ => Err(error::rest_error(status, &bytes, &context, &self.endpoint)),
            }
        }
        .instrument(span)
        .await
    }
}
