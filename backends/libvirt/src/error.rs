//! The one place where libvirt and tool failures become [`stagecore::Error`].
//!
//! libvirt error numbers map to typed variants: missing objects → `NotFound`, clashes →
//! `AlreadyExists`, connection failures → `Unreachable`, authentication → `Unauthenticated`,
//! invalid operations for the object's state → `Precondition`, unsupported → `NotSupported`,
//! timeouts → `Timeout`, the rest → `Backend { backend: "libvirt" }` with libvirt's message —
//! temporary (`Error::backend_temporary`) when libvirt says the call timed out or lost its
//! connection, or the object is busy. `NotFound` / `AlreadyExists` carry libvirt's error as their
//! source. `stagecore-qcow2` errors are mapped here too ([`qcow2`]), once, naming this backend.

use stagecore::Error;
use virt::error::{ErrorDomain, ErrorNumber};

/// The backend name used in errors.
pub(crate) const NAME: &str = "libvirt";

/// What a libvirt call was about, so the error can name it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    /// The connection URI (never carries a password: libvirt URIs hold none we accept).
    pub(crate) uri: &'a str,
    /// The kind of object addressed (`domain`, `network`, `snapshot`).
    pub(crate) kind: &'static str,
    /// Its name.
    pub(crate) name: &'a str,
}

/// Maps one libvirt error.
pub(crate) fn map(e: &virt::error::Error, ctx: Ctx<'_>) -> Error {
    let code = e.code().unwrap_or(ErrorNumber::InternalError);
    let domain = e.domain().unwrap_or(ErrorDomain::None);
    let msg = e.message().to_string();
    let name = || ctx.name.to_string();
    match code {
        ErrorNumber::NoDomain => Error::not_found_because("domain", name(), e.clone()),
        ErrorNumber::NoNetwork => Error::not_found_because("network", name(), e.clone()),
        ErrorNumber::NoDomainSnapshot => Error::not_found_because("snapshot", name(), e.clone()),
        ErrorNumber::NoStorageVolume | ErrorNumber::NoStoragePool => {
            Error::not_found_because(ctx.kind, name(), e.clone())
        }
        ErrorNumber::NoDomainMetadata => Error::not_found_because("domain metadata", name(), e.clone()),
        ErrorNumber::DomExist | ErrorNumber::NetworkExist | ErrorNumber::StorageVolExist => {
            Error::already_exists_because(ctx.kind, name(), e.clone())
        }
        ErrorNumber::AuthFailed | ErrorNumber::AuthCancelled | ErrorNumber::AuthUnavailable => {
            Error::Unauthenticated { endpoint: ctx.uri.to_string(), reason: msg }
        }
        ErrorNumber::AgentUnresponsive | ErrorNumber::AgentUnsynced => Error::Unreachable {
            endpoint: format!("guest agent of {} {} ({})", ctx.kind, ctx.name, ctx.uri),
            reason: msg,
        },
        ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc | ErrorNumber::UnknownHost => {
            Error::Unreachable { endpoint: ctx.uri.to_string(), reason: msg }
        }
        ErrorNumber::SystemError if matches!(domain, ErrorDomain::Rpc | ErrorDomain::Remote) => {
            Error::Unreachable { endpoint: ctx.uri.to_string(), reason: msg }
        }
        ErrorNumber::OperationInvalid => Error::Precondition(format!("{} {}: {msg}", ctx.kind, ctx.name)),
        ErrorNumber::OperationTimeout | ErrorNumber::AgentCommandTimeout => {
            Error::Timeout { operation: format!("{} {}: {msg}", ctx.kind, ctx.name), seconds: 0.0 }
        }
        ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported | ErrorNumber::ArgumentUnsupported => {
            Error::backend_msg(NAME, format!("{} {}: not supported: {msg}", ctx.kind, ctx.name))
        }
        ErrorNumber::XmlError | ErrorNumber::XmlDetail | ErrorNumber::XmlInvalidSchema | ErrorNumber::InvalidArg => {
            Error::invalid(format!("{} {}", ctx.kind, ctx.name), msg)
        }
        ErrorNumber::ResourceBusy => Error::backend_temporary(NAME, format!("{} {}: {msg}", ctx.kind, ctx.name)),
        _ if is_temporary(&msg) => Error::backend_temporary(NAME, format!("{} {}: {msg}", ctx.kind, ctx.name)),
        _ => Error::backend_msg(NAME, format!("{} {}: {msg}", ctx.kind, ctx.name)),
    }
}

/// Whether libvirt's message says the same call may work later: it timed out (libvirt's
/// "Timed out during operation: cannot acquire state change lock", "operation timed out") or
/// lost its connection ("connection reset", "End of file while reading data").
fn is_temporary(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    ["timed out", "connection", "end of file while reading", "cannot acquire state change lock"]
        .iter()
        .any(|t| m.contains(t))
}

/// Maps a `stagecore-qcow2` error, naming this backend (its table: `stagecore_qcow2::Error::into_core`).
pub(crate) fn qcow2(e: stagecore_qcow2::Error) -> Error {
    e.into_core(NAME)
}

/// Maps the failure of one guest agent command sent through libvirt to `domain` `ctx.name`.
///
/// "Guest agent is not responding" / "not connected" → `Unreachable` naming the domain; a command
/// that ran out of `seconds` → `Timeout`; an error reply of the agent itself (libvirt reports it as
/// "unable to execute QEMU agent command '…': <desc>") → [`stagecore_qga::AgentFailure`] labelled
/// `label` (`env/machine`), so callers see what the agent said; the rest as [`map`].
pub(crate) fn agent(e: &virt::error::Error, ctx: Ctx<'_>, label: &str, command: &str, seconds: i32) -> Error {
    let code = e.code().unwrap_or(ErrorNumber::InternalError);
    let msg = e.message().to_string();
    match code {
        ErrorNumber::AgentCommandTimeout | ErrorNumber::OperationTimeout => Error::Timeout {
            operation: format!("guest agent command `{command}` in {label} (domain {})", ctx.name),
            seconds: f64::from(seconds),
        },
        ErrorNumber::AgentCommandFailed | ErrorNumber::InternalError
            if msg.contains("unable to execute QEMU agent command") =>
        {
            let desc = msg.split_once("': ").map(|(_, d)| d.to_string()).unwrap_or(msg);
            stagecore_qga::AgentFailure::new(label, command, "", desc).into()
        }
        _ => map(e, ctx),
    }
}

/// An I/O failure on a file this backend manages: `NotFound` (with the I/O error as source)
/// when it is missing, else [`Error::Io`] naming the file.
pub(crate) fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        return Error::not_found_because("file", path.display().to_string(), e);
    }
    Error::io("accessing", path, e)
}

/// Internal bookkeeping that cannot be (de)serialised.
pub(crate) fn json(what: &str, e: serde_json::Error) -> Error {
    Error::backend_msg(NAME, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use virt::connect::Connect;

    use super::*;

    const URI: &str = "test:///default";

    fn ctx<'a>(kind: &'static str, name: &'a str) -> Ctx<'a> {
        Ctx { uri: URI, kind, name }
    }

    #[test]
    fn maps_real_libvirt_errors() {
        virt::error::clear_error_callback();
        let c = Connect::open(Some(URI)).expect("the test driver needs no daemon");
        let e = c.lookup_domain_by_name("missing").unwrap_err();
        let mapped = map(&e, ctx("domain", "missing"));
        assert!(matches!(&mapped, Error::NotFound { kind: "domain", source: Some(_), .. }), "{mapped:?}");
        let e = c.lookup_network_by_name("missing").unwrap_err();
        assert!(matches!(map(&e, ctx("network", "missing")), Error::NotFound { kind: "network", .. }));
        let e = c.define_domain_xml("<domain").unwrap_err();
        assert!(matches!(map(&e, ctx("domain", "x")), Error::InvalidSpec { .. }), "{e}");
        let net = c.lookup_network_by_name("default").unwrap();
        let e = net.create().unwrap_err();
        assert!(matches!(map(&e, ctx("network", "default")), Error::Precondition(_)), "{e}");
    }

    #[test]
    fn a_missing_daemon_is_unreachable() {
        virt::error::clear_error_callback();
        let uri = "qemu:///system?socket=/nonexistent/stagecore.sock";
        let e = Connect::open(Some(uri)).unwrap_err();
        let mapped = map(&e, Ctx { uri, kind: "connection", name: uri });
        assert!(matches!(&mapped, Error::Unreachable { endpoint, .. } if endpoint == uri), "{mapped:?}");
        assert!(mapped.is_temporary());
    }

    #[test]
    fn timeouts_and_lost_connections_are_temporary() {
        assert!(is_temporary("Timed out during operation: cannot acquire state change lock"));
        assert!(is_temporary("internal error: connection reset by peer"));
        assert!(!is_temporary("internal error: unknown disk bus"));
    }

    #[test]
    fn qcow2_errors_name_this_backend() {
        let dir = std::env::temp_dir().join(format!("lv-qcow2-{}", std::process::id()));
        let e = stagecore_qcow2::info(&dir.join("missing.qcow2")).unwrap_err();
        let mapped = qcow2(e);
        assert!(matches!(&mapped, Error::NotFound { source: Some(_), .. }), "{mapped:?}");
    }
}
