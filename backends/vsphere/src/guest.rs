//! The vSphere [`GuestChannel`]: guest operations through VMware Tools (Automation REST API).
//!
//! Contract: `exec` starts `/bin/sh -c 'ARGV <IN >OUT 2>ERR'` as a guest process, polls it
//! until it exits (or `GuestExec::timeout` passes: `Error::Timeout`, the process is left
//! running), then fetches OUT and ERR by file transfers and removes the temporary files — vSphere
//! guest processes have no stdout/stderr capture of their own. Standard input, when given, is
//! uploaded first to IN. `write_file`/`read_file` are single file transfers. `wait_ready` lists
//! processes until VMware Tools answers. Guest credentials come from
//! [`crate::VsphereOptions::guest_credentials`] and never appear in `Debug`, errors or logs.
//! Linux guests only (a POSIX `sh`, `/tmp`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use stagecore::{Error, GuestChannel, GuestExec, GuestOutput, Result};
use tokio::time::Instant;
use tracing::Instrument;

use crate::env::VsphereEnvironment;
use crate::{BACKEND, GuestCredentials};

/// Single-quotes a word for `sh`.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl VsphereEnvironment {
    fn guest_target(&self, machine: &str) -> Result<(String, &GuestCredentials)> {
        let creds = self
            .shared
            .opts
            .guest_credentials
            .as_ref()
            .ok_or_else(|| Error::not_supported("guest operations without guest credentials", BACKEND))?;
        let vm = crate::record::machine(&self.record()?, machine)?.vm.clone();
        Ok((vm, creds))
    }

    async fn remove_temp(&self, vm: &str, creds: &GuestCredentials, files: &[String]) {
        let client = &self.shared.client;
        let args = format!("-f {}", files.iter().map(|f| shell_quote(f)).collect::<Vec<_>>().join(" "));
        if let Err(e) =
            client.guest_process_create(vm, &creds.username, &creds.password, "/bin/rm", &args, &BTreeMap::new()).await
        {
            tracing::warn!(vm, error = %e, "could not remove temporary guest files");
        }
    }
}

#[async_trait]
impl GuestChannel for VsphereEnvironment {
    async fn exec(&self, machine: &str, request: &GuestExec) -> Result<GuestOutput> {
        let span =
            tracing::info_span!("vsphere.guest_exec", environment = %self.name, machine, command = %request.display());
        async {
            if request.argv.is_empty() {
                return Err(Error::invalid("guest.argv", "is empty"));
            }
            let (vm, creds) = self.guest_target(machine)?;
            let client = &self.shared.client;
            let (user, pw) = (creds.username.as_str(), &creds.password);
            let base = format!("/tmp/.stagecore-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
            let (out, err, inp) = (format!("{base}.out"), format!("{base}.err"), format!("{base}.in"));
            let mut temp = vec![out.clone(), err.clone()];
            let stdin = match &request.stdin {
                Some(data) => {
                    client.guest_upload(&vm, user, pw, &inp, data, Some(0o600)).await?;
                    temp.push(inp.clone());
                    inp.clone()
                }
                None => "/dev/null".to_string(),
            };
            let mut env = BTreeMap::new();
            for kv in &request.env {
                let (k, v) =
                    kv.split_once('=').ok_or_else(|| Error::invalid("guest.env", "entries must be KEY=VALUE"))?;
                env.insert(k.to_string(), v.to_string());
            }
            let argv: Vec<String> = request.argv.iter().map(|a| shell_quote(a)).collect();
            let script = format!("{} <{stdin} >{out} 2>{err}", argv.join(" "));
            let arguments = format!("-c {}", shell_quote(&script));
            let pid = client.guest_process_create(&vm, user, pw, "/bin/sh", &arguments, &env).await?;
            let started = Instant::now();
            let mut interval = Duration::from_millis(10);
            let exit_code = loop {
                let p = client.guest_process_get(&vm, user, pw, pid).await?;
                if let Some(code) = p.exit_code {
                    break code;
                }
                if started.elapsed() >= request.timeout {
                    self.remove_temp(&vm, creds, &temp).await;
                    return Err(Error::Timeout {
                        operation: format!("guest command `{}` in {machine}", request.display()),
                        seconds: request.timeout.as_secs_f64(),
                    });
                }
                tokio::time::sleep(interval.min(request.timeout.saturating_sub(started.elapsed()))).await;
                interval = (interval * 2).min(Duration::from_millis(500));
            };
            let stdout = client.guest_download(&vm, user, pw, &out).await;
            let stderr = client.guest_download(&vm, user, pw, &err).await;
            self.remove_temp(&vm, creds, &temp).await;
            let (stdout, stderr) = match (stdout, stderr) {
                (Ok(o), Ok(e)) => (o, e),
                // The shell could not even open the redirections: nothing was captured.
                (Err(Error::NotFound { .. }), _) | (_, Err(Error::NotFound { .. })) => (Vec::new(), Vec::new()),
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
            let exit_code = i32::try_from(exit_code).unwrap_or(i32::MAX);
            tracing::debug!(exit_code, stdout = stdout.len(), stderr = stderr.len(), "guest command finished");
            Ok(GuestOutput { exit_code, stdout, stderr, truncated: false })
        }
        .instrument(span)
        .await
    }

    async fn write_file(&self, machine: &str, path: &str, content: &[u8], mode: Option<u32>) -> Result<()> {
        let span = tracing::info_span!("vsphere.guest_write", environment = %self.name, machine, path);
        async {
            let (vm, creds) = self.guest_target(machine)?;
            self.shared.client.guest_upload(&vm, &creds.username, &creds.password, path, content, mode).await
        }
        .instrument(span)
        .await
    }

    async fn read_file(&self, machine: &str, path: &str) -> Result<Vec<u8>> {
        let span = tracing::info_span!("vsphere.guest_read", environment = %self.name, machine, path);
        async {
            let (vm, creds) = self.guest_target(machine)?;
            self.shared.client.guest_download(&vm, &creds.username, &creds.password, path).await
        }
        .instrument(span)
        .await
    }

    async fn wait_ready(&self, machine: &str, timeout: Duration) -> Result<()> {
        let (vm, creds) = self.guest_target(machine)?;
        let started = Instant::now();
        loop {
            match self.shared.client.guest_process_list(&vm, &creds.username, &creds.password).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_temporary() && started.elapsed() < timeout => {
                    tracing::debug!(vm, error = %e, "VMware Tools not answering yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) if e.is_temporary() => {
                    return Err(Error::Timeout {
                        operation: format!("waiting for VMware Tools in {machine} ({e})"),
                        seconds: timeout.as_secs_f64(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
}
