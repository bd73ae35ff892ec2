//! [`VsphereClient`]: sessions, deadlines, retries and the raw call path shared by REST and VI/JSON.
//!
//! Contract: every call runs within `config.deadline` (retries included); temporary failures (503,
//! connection errors, timeouts) are retried with jittered exponential backoff while the deadline
//! allows — but only where repeating cannot do something twice ([`retry`]); a
//! 401 (or a VI/JSON `NotAuthenticated` fault) triggers exactly one re-login, after which a second
//! rejection is `Error::Unauthenticated`. Tokens are kept as [`Secret`]s and never logged.

pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod guest;
pub(crate) mod rest;
pub(crate) mod retry;
pub(crate) mod task;
pub(crate) mod vim;

use crate::BACKEND;
use config::VsphereConfig;
use reqwest::Method;
use serde_json::Value;
use stagecore::{Error, Result, Secret};
use std::fmt;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

/// Which API a call goes to (they have separate sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Rest,
    Vim,
}

/// A raw response.
pub(crate) struct Raw {
    status: u16,
    body: bytes::Bytes,
    session_header: Option<Secret>,
}

/// The VI/JSON releases this client speaks, newest first. VI/JSON exists from vSphere 8.0U1
/// (release 8.0.1.0); every method the backend uses is in 8.0.1.0.
pub const VIM_RELEASES: [&str; 4] = ["9.0.0.0", "8.0.3.0", "8.0.2.0", "8.0.1.0"];

/// What was negotiated with the server's VI/JSON API at connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VimEndpoint {
    /// The release segment of every VI/JSON path (`8.0.2.0`).
    pub release: String,
    /// `ServiceContent.sessionManager` (the id Login and Logout go to).
    pub session_manager: String,
    /// `ServiceContent.about.apiVersion`: the server's own newest release.
    pub api_version: String,
    /// `ServiceContent.about.fullName`.
    pub full_name: String,
}

/// A client for one vCenter. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct VsphereClient {
    http: reqwest::Client,
    config: VsphereConfig,
    endpoint: String,
    rest_token: Mutex<Option<Secret>>,
    vim_token: Mutex<Option<Secret>>,
    /// `Ok`: VI/JSON is available; `Err(reason)`: it is not (vCenter 7.0.x, no common release).
    vim: std::result::Result<VimEndpoint, String>,
}

impl fmt::Debug for VsphereClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are deliberately left out; the password is a `Secret`.
        f.debug_struct("VsphereClient")
            .field("endpoint", &self.endpoint)
            .field("username", &self.config.username)
            .field("vim", &self.vim)
            .finish_non_exhaustive()
    }
}

impl VsphereClient {
    /// Builds the HTTP client and logs in to the REST API (so wrong credentials fail here).
    pub async fn connect(config: VsphereConfig) -> Result<Self> {
        let endpoint = config.endpoint();
        let span = tracing::info_span!("vsphere.connect", endpoint = %endpoint, user = %config.username);
        async move {
            let http = build_http(&config)?;
            let mut client = VsphereClient {
                http,
                config,
                endpoint,
                rest_token: Mutex::new(None),
                vim_token: Mutex::new(None),
                vim: Err("not negotiated yet".into()),
            };
            let deadline = Instant::now() + client.config.deadline;
            let token = client.login(Api::Rest, deadline).await?;
            *client.rest_token.lock().await = Some(token);
            client.vim = client.negotiate(deadline).await?;
            match &client.vim {
                Ok(v) => tracing::info!(release = %v.release, server = %v.full_name, "connected"),
                Err(reason) => tracing::warn!(%reason, "connected without VI/JSON: no snapshots, linked clones or CBT"),
            }
            Ok(client)
        }
        .instrument(span)
        .await
    }

    /// Finds the VI/JSON release and the SessionManager: `POST /api/vcenter/system?action=hello`
    /// (unless `config.release` is set), then the anonymous `ServiceContent`. A server without
    /// VI/JSON (404) is not an error: the reason is kept and VI/JSON calls fail with it.
    async fn negotiate(&self, deadline: Instant) -> Result<std::result::Result<VimEndpoint, String>> {
        let span = tracing::debug_span!("vsphere.negotiate");
        async {
            let release = match &self.config.release {
                Some(r) => r.clone(),
                None => {
                    let body = serde_json::json!({"api_releases": VIM_RELEASES});
                    let query = [("action", "hello".to_string())];
                    let raw = self
                        .send(Method::POST, "/api/vcenter/system", &query, Some(&body), None, deadline, "negotiate")
                        .await?;
                    if raw.status == 404 {
                        return Ok(Err(format!(
                            "vCenter at {} offers no VI/JSON API (POST /api/vcenter/system?action=hello: HTTP 404; \
                             VI/JSON needs vSphere 8.0U1 or later)",
                            self.endpoint
                        )));
                    }
                    let v = self.decode(Api::Rest, raw, "negotiate")?;
                    match v["api_release"].as_str() {
                        Some("") => {
                            return Ok(Err(format!(
                                "vCenter at {} shares no VI/JSON release with this client (it speaks {})",
                                self.endpoint,
                                VIM_RELEASES.join(", ")
                            )));
                        }
                        Some(r) => r.to_string(),
                        None => return Err(error::malformed("negotiate", "hello answer without api_release")),
                    }
                }
            };
            if release.is_empty() || !release.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(error::malformed("negotiate", format!("`{release}` is not a VI/JSON release")));
            }
            let path = format!("/sdk/vim25/{release}/ServiceInstance/ServiceInstance/content");
            let raw = self.send(Method::GET, &path, &[], None, None, deadline, "service content").await?;
            if raw.status == 404 {
                return Ok(Err(format!(
                    "vCenter at {} does not serve VI/JSON release {release} (HTTP 404)",
                    self.endpoint
                )));
            }
            let content = self.decode(Api::Vim, raw, "service content")?;
            let session_manager = content["sessionManager"]["value"]
                .as_str()
                .ok_or_else(|| error::malformed("service content", "ServiceContent without sessionManager"))?
                .to_string();
            rest::check_id("sessionManager", &session_manager)?;
            let about = &content["about"];
            let endpoint = VimEndpoint {
                release,
                session_manager,
                api_version: about["apiVersion"].as_str().unwrap_or_default().to_string(),
                full_name: about["fullName"].as_str().unwrap_or_default().to_string(),
            };
            tracing::debug!(release = %endpoint.release, api_version = %endpoint.api_version, "VI/JSON negotiated");
            Ok(Ok(endpoint))
        }
        .instrument(span)
        .await
    }

    /// What was negotiated with VI/JSON, or why it is unavailable.
    pub fn vim_endpoint(&self) -> std::result::Result<&VimEndpoint, &str> {
        self.vim.as_ref().map_err(String::as_str)
    }

    /// The VI/JSON endpoint, or `NotSupported` when the server has none.
    pub(crate) fn vim(&self) -> Result<&VimEndpoint> {
        self.vim.as_ref().map_err(|reason| {
            tracing::debug!(%reason, "VI/JSON unavailable");
            Error::not_supported("snapshots, linked clones and CBT (they need VI/JSON, vSphere 8.0U1+)", BACKEND)
        })
    }

    /// The configuration this client was built from.
    pub fn config(&self) -> &VsphereConfig {
        &self.config
    }

    /// Logs out of both APIs (`DELETE /api/session`, `SessionManager.Logout`).
    pub async fn close(self) -> Result<()> {
        let deadline = Instant::now() + self.config.deadline;
        let mut first_error = None;
        if let Some(token) = self.rest_token.lock().await.take() {
            let r = self.send(Method::DELETE, "/api/session", &[], None, Some(&token), deadline, "logout").await;
            if let Err(e) = r.and_then(|raw| self.decode(Api::Rest, raw, "logout").map(|_| ())) {
                first_error.get_or_insert(e);
            }
        }
        if let (Some(token), Ok(vim)) = (self.vim_token.lock().await.take(), &self.vim) {
            let path = format!("/sdk/vim25/{}/SessionManager/{}/Logout", vim.release, vim.session_manager);
            let r = self.send(Method::POST, &path, &[], None, Some(&token), deadline, "logout").await;
            if let Err(e) = r.and_then(|raw| self.decode(Api::Vim, raw, "logout").map(|_| ())) {
                first_error.get_or_insert(e);
            }
        }
        tracing::info!(endpoint = %self.endpoint, "closed");
        match first_error {
            // A session that already expired is as good as logged out.
            Some(Error::Unauthenticated { .. }) | None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// One authenticated call with deadline, retries and one transparent re-login.
    pub(crate) async fn call(
        &self,
        api: Api,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        context: &str,
    ) -> Result<Value> {
        let span = tracing::debug_span!("vsphere.call", api = ?api, method = %method, path = %path);
        let deadline = Instant::now() + self.config.deadline;
        let work = async {
            let mut relogged = false;
            loop {
                let token = self.token(api, deadline).await?;
                let raw = self.send(method.clone(), path, query, body, Some(&token), deadline, context).await?;
                if session_rejected(api, &raw) {
                    if relogged {
                        // Keep the server's reason when it gives one (wrong guest credentials
                        // are a 401 too); never the request body.
                        return Err(match self.decode(api, raw, context) {
                            Err(e @ Error::Unauthenticated { .. }) => e,
                            _ => Error::Unauthenticated {
                                endpoint: self.endpoint.clone(),
                                reason: "session rejected again right after a fresh login".into(),
                            },
                        });
                    }
                    tracing::info!("session expired; logging in again");
                    relogged = true;
                    self.relogin(api, &token, deadline).await?;
                    continue;
                }
                return self.decode(api, raw, context);
            }
        };
        match tokio::time::timeout_at(deadline, work).instrument(span).await {
            Ok(r) => r,
            Err(_) => {
                Err(Error::Timeout { operation: context.to_string(), seconds: self.config.deadline.as_secs_f64() })
            }
        }
    }

    async fn token(&self, api: Api, deadline: Instant) -> Result<Secret> {
        let mut slot = self.slot(api).lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(t.clone());
        }
        let t = self.login(api, deadline).await?;
        *slot = Some(t.clone());
        Ok(t)
    }

    async fn relogin(&self, api: Api, stale: &Secret, deadline: Instant) -> Result<()> {
        let mut slot = self.slot(api).lock().await;
        if slot.as_ref().is_some_and(|t| t != stale) {
            return Ok(()); // another call already renewed it
        }
        *slot = Some(self.login(api, deadline).await?);
        Ok(())
    }

    fn slot(&self, api: Api) -> &Mutex<Option<Secret>> {
        match api {
            Api::Rest => &self.rest_token,
            Api::Vim => &self.vim_token,
        }
    }

    async fn login(&self, api: Api, deadline: Instant) -> Result<Secret> {
        let span = tracing::debug_span!("vsphere.login", api = ?api, user = %self.config.username);
        async {
            let raw = match api {
                Api::Rest => self.send(Method::POST, "/api/session", &[], None, None, deadline, "login").await?,
                Api::Vim => {
                    let vim = self.vim()?;
                    let path = format!("/sdk/vim25/{}/SessionManager/{}/Login", vim.release, vim.session_manager);
                    let body = serde_json::json!({"userName": self.config.username, "password": self.config.password.expose()});
                    self.send(Method::POST, &path, &[], Some(&body), None, deadline, "login").await?
                }
            };
            let session_header = raw.session_header.clone();
            let value = self.decode(api, raw, "login")?;
            let token = match api {
                Api::Rest => value.as_str().map(Secret::new),
                Api::Vim => session_header,
            };
            let token = token.ok_or_else(|| error::malformed("login", "no session token in the login response"))?;
            tracing::debug!("logged in");
            Ok(token)
        }
        .instrument(span)
        .await
    }

    /// Sends one request, retrying temporary failures while the deadline allows.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        token: Option<&Secret>,
        deadline: Instant,
        context: &str,
    ) -> Result<Raw> {
        let mut url =
            self.config.base_url.join(path).map_err(|e| Error::invalid(context, format!("bad path {path}: {e}")))?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let policy = &self.config.retry;
        let repeatable = retry::repeatable(&method, path, context);
        let mut backoff = policy.initial_backoff;
        let mut attempt = 1;
        loop {
            let mut req = self.http.request(method.clone(), url.clone());
            match token {
                Some(t) => req = req.header("vmware-api-session-id", t.expose()),
                None if path == "/api/session" => {
                    req = req.basic_auth(&self.config.username, Some(self.config.password.expose()))
                }
                None => {}
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let outcome = match req.send().await {
                Ok(resp) => read(resp).await,
                Err(e) => Err(e),
            };
            let (err, retryable) = match outcome {
                Ok(raw) if raw.status == 503 => {
                    let err = error::service_unavailable(context);
                    if attempt >= policy.max_attempts {
                        return Ok(raw);
                    }
                    (err, true)
                }
                Ok(raw) => return Ok(raw),
                Err(e) if e.is_connect() || repeatable => error::transport(&e, &self.endpoint, context),
                // The request may have reached the server and been carried out: never send it again.
                Err(e) => return Err(error::maybe_applied(&e, &self.endpoint, context)),
            };
            if !retryable || attempt >= policy.max_attempts || Instant::now() + backoff >= deadline {
                return Err(err);
            }
            let wait = retry::jittered(backoff);
            tracing::warn!(attempt, backoff_ms = wait.as_millis() as u64, error = %err, "temporary failure; retrying");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(policy.max_backoff);
            attempt += 1;
        }
    }

    /// Turns a raw response into JSON (`Null` for an empty body) or a mapped error.
    fn decode(&self, api: Api, raw: Raw, context: &str) -> Result<Value> {
        let parsed = if raw.body.is_empty() { Ok(Value::Null) } else { serde_json::from_slice::<Value>(&raw.body) };
        if (200..300).contains(&raw.status) {
            return parsed.map_err(|e| error::malformed(context, format!("response is not JSON: {e}")));
        }
        match (api, parsed) {
            (Api::Rest, _) => Err(error::rest_error(raw.status, &raw.body, context, &self.endpoint)),
            (Api::Vim, Ok(v)) if v.get("_typeName").is_some() => Err(error::vim_fault(&v, context, &self.endpoint)),
            (Api::Vim, _) if raw.status == 503 => Err(error::service_unavailable(context)),
            (Api::Vim, _) if raw.status == 401 => {
                Err(Error::Unauthenticated { endpoint: self.endpoint.clone(), reason: format!("{context}: HTTP 401") })
            }
            (Api::Vim, _) => Err(error::malformed(context, format!("HTTP {} without a fault body", raw.status))),
        }
    }
}

fn session_rejected(api: Api, raw: &Raw) -> bool {
    raw.status == 401
        || (api == Api::Vim
            && raw.status >= 400
            && serde_json::from_slice::<Value>(&raw.body).is_ok_and(|v| error::is_not_authenticated(&v)))
}

async fn read(resp: reqwest::Response) -> Result<Raw, reqwest::Error> {
    let status = resp.status().as_u16();
    let session_header = resp.headers().get("vmware-api-session-id").and_then(|v| v.to_str().ok()).map(Secret::new);
    let body = resp.bytes().await?;
    Ok(Raw { status, body, session_header })
}

fn build_http(config: &VsphereConfig) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(config.deadline.min(std::time::Duration::from_secs(15)))
        .user_agent(concat!("stagecore-vsphere/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_cert_pem {
        let pem = std::fs::read(path)
            .map_err(|e| Error::invalid("vsphere.ca_cert_pem", format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Error::invalid("vsphere.ca_cert_pem", format!("{} is not PEM: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::invalid("vsphere.ca_cert_pem", format!("{} holds no certificate", path.display())));
        }
        builder = builder.tls_certs_merge(certs);
    }
    if config.insecure {
        tracing::warn!(endpoint = %config.endpoint(), "TLS certificate verification is DISABLED (insecure mode)");
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|e| Error::backend(BACKEND, e))
}
