//! An inventory as comparable items: `(category, item) → value`, the one shape the drift engine,
//! footprints and rebase compare.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::GuestInventory;

/// What kind of thing a guest item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The OS release (`/etc/os-release`: id, version, pretty name); item `""`.
    Os,
    /// The running kernel (`uname -r`); item `""`.
    Kernel,
    /// An installed package (dpkg or rpm), by name; value `{version, arch}`.
    Packages,
    /// A service, by name; value `{state, running}`.
    Services,
    /// A listening port, `tcp:8080`; value: the local addresses.
    Ports,
    /// A file under a watched path, by absolute path; value `{sha256}`.
    Files,
}

impl Category {
    /// The path segment (`packages`).
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Os => "os",
            Category::Kernel => "kernel",
            Category::Packages => "packages",
            Category::Services => "services",
            Category::Ports => "ports",
            Category::Files => "files",
        }
    }
}

/// Key of one item.
pub type ItemKey = (Category, String);

/// The drift-record path of an item: `/machines/web/guest/packages/nginx`,
/// `/machines/app/guest/files/etc/app.conf`, `/machines/web/guest/kernel`.
pub fn item_path(machine: &str, category: Category, item: &str) -> String {
    let m = machine.replace('~', "~0").replace('/', "~1");
    match (category, item) {
        (_, "") => format!("/machines/{m}/guest/{}", category.as_str()),
        (Category::Files, path) => format!("/machines/{m}/guest/files{path}"),
        (c, item) => format!("/machines/{m}/guest/{}/{}", c.as_str(), item.replace('~', "~0").replace('/', "~1")),
    }
}

/// Every comparable item of an inventory. Hostname and collection metadata are not items: a
/// stage must differ in them.
pub fn items(inv: &GuestInventory) -> BTreeMap<ItemKey, Value> {
    let mut out = BTreeMap::new();
    out.insert(
        (Category::Os, String::new()),
        json!({"id": inv.os.id, "version_id": inv.os.version_id, "pretty_name": inv.os.pretty_name}),
    );
    out.insert((Category::Kernel, String::new()), json!(inv.kernel));
    for (name, p) in &inv.packages {
        out.insert((Category::Packages, name.clone()), json!({"version": p.version, "arch": p.arch}));
    }
    for (name, s) in &inv.services {
        out.insert((Category::Services, name.clone()), json!({"state": s.state, "running": s.running}));
    }
    for (port, addrs) in &inv.ports {
        out.insert((Category::Ports, port.clone()), json!(addrs));
    }
    for (path, hash) in &inv.files {
        out.insert((Category::Files, path.clone()), json!({"sha256": hash}));
    }
    out
}

/// One item that differs between two inventories (`Null` = absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDelta {
    /// The item's drift path (`/machines/app/guest/packages/nginx`).
    pub path: String,
    /// Its category.
    pub category: Category,
    /// The item (package name, file path, `tcp:8080`; empty for os and kernel).
    pub item: String,
    /// Its value before (`null`: absent).
    pub before: Value,
    /// Its value after (`null`: absent).
    pub after: Value,
}

/// The items that differ between `before` and `after` of `machine`.
pub fn delta(machine: &str, before: &GuestInventory, after: &GuestInventory) -> Vec<GuestDelta> {
    let (b, a) = (items(before), items(after));
    let keys: BTreeSet<&ItemKey> = b.keys().chain(a.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (bv, av) = (b.get(k).cloned().unwrap_or(Value::Null), a.get(k).cloned().unwrap_or(Value::Null));
            (bv != av).then(|| GuestDelta {
                path: item_path(machine, k.0, &k.1),
                category: k.0,
                item: k.1.clone(),
                before: bv,
                after: av,
            })
        })
        .collect()
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (also `/`).
pub(crate) fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(item_path("web", Category::Packages, "nginx"), "/machines/web/guest/packages/nginx");
        assert_eq!(item_path("app", Category::Files, "/etc/app.conf"), "/machines/app/guest/files/etc/app.conf");
        assert_eq!(item_path("web", Category::Kernel, ""), "/machines/web/guest/kernel");
        assert_eq!(item_path("web", Category::Ports, "tcp:8080"), "/machines/web/guest/ports/tcp:8080");
    }

    #[test]
    fn globs() {
        assert!(glob("/etc/ssh/ssh_host_*", "/etc/ssh/ssh_host_ed25519_key.pub"));
        assert!(glob("/etc/hostname", "/etc/hostname"));
        assert!(!glob("/etc/hostname", "/etc/hostname2"));
        assert!(glob("*.swp", "/etc/a/b.swp"));
        assert!(!glob("/etc/*.conf", "/etc/app.cfg"));
    }
}
