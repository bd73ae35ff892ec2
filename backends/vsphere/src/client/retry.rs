//! Which requests may be sent again, and how long to wait before.
//!
//! Contract: a request is repeated only when repeating it cannot do something twice. GET, HEAD,
//! PUT, DELETE and OPTIONS are idempotent by HTTP's definition; logins only create another
//! session; VI/JSON methods that only read (`Retrieve…`, `Query…`, `Find…`, `Browse…`) change
//! nothing. Every other POST — `CloneVM_Task`, `CreateSnapshotEx_Task`, `PowerOnVM_Task`,
//! REST `?action=clone` — is repeated only when it provably never reached the server (the
//! connection was refused) or the server answered 503 (it did not take the request). After a
//! timeout or a connection lost mid-request, such a call fails with a note saying it may have
//! been carried out, so a retry never makes a second clone or snapshot.
//!
//! Backoff is exponential with jitter ("equal jitter": half the step fixed, half random), so
//! clients that failed together do not retry together.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use reqwest::Method;

/// Whether sending this request twice has the same effect as sending it once.
pub(crate) fn repeatable(method: &Method, path: &str, context: &str) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS) {
        return true;
    }
    // `negotiate` is `POST /api/vcenter/system?action=hello`: it only reads which release to use.
    if context == "login" || context == "logout" || context == "negotiate" {
        return true;
    }
    if path.starts_with("/sdk/vim25/") {
        let vim_method = path.rsplit('/').next().unwrap_or_default();
        return ["Retrieve", "Query", "Find", "Browse"].iter().any(|p| vim_method.starts_with(p));
    }
    false
}

/// The wait before the next attempt: between half of `step` and `step`.
pub(crate) fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
    if spread == 0 {
        return step;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    half + Duration::from_micros(h.finish() % (spread + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_cannot_do_twice_are_repeatable() {
        let vim = |m: &str| format!("/sdk/vim25/8.0.2.0/VirtualMachine/vm-1/{m}");
        assert!(repeatable(&Method::GET, "/api/vcenter/vm", "list"));
        assert!(repeatable(&Method::DELETE, "/api/vcenter/vm/vm-1", "delete"));
        assert!(repeatable(&Method::POST, "/api/session", "login"));
        assert!(repeatable(&Method::POST, "/api/vcenter/system", "negotiate"));
        assert!(repeatable(&Method::POST, "/sdk/vim25/8.0.2.0/PropertyCollector/pc/RetrievePropertiesEx", "props"));
        assert!(repeatable(&Method::POST, &vim("QueryChangedDiskAreas"), "cbt"));
        assert!(!repeatable(&Method::POST, &vim("CloneVM_Task"), "clone"));
        assert!(!repeatable(&Method::POST, &vim("CreateSnapshotEx_Task"), "snapshot"));
        assert!(!repeatable(&Method::POST, "/api/vcenter/vm", "clone"));
        assert!(!repeatable(&Method::POST, "/api/vcenter/vm/vm-1/power", "power on"));
    }

    #[test]
    fn jitter_stays_between_half_and_whole_step() {
        let step = Duration::from_millis(200);
        let waits: Vec<Duration> = (0..64).map(|_| jittered(step)).collect();
        assert!(waits.iter().all(|w| *w >= step / 2 && *w <= step), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter at all: {waits:?}");
    }
}
