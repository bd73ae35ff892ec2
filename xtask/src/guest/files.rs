//! The recipe's own files, stored beside this module in `files/` and embedded in the binary.

/// PID 1 of the guest, also installed as `/sbin/shutdown`, `poweroff`, `halt` and `reboot`.
pub(crate) const GUESTINIT: &str = include_str!("files/guestinit");
/// The service supervisor, `/usr/local/sbin/svc`.
pub(crate) const SVC: &str = include_str!("files/svc");
/// `/init` of the tiny initramfs.
pub(crate) const INITRAMFS_INIT: &str = include_str!("files/initramfs-init");
/// Demo app: `DEBIAN/control` template (`@VERSION@`).
pub(crate) const APP_CONTROL: &str = include_str!("files/app-control");
/// Demo app: `DEBIAN/postinst`.
pub(crate) const APP_POSTINST: &str = include_str!("files/app-postinst");
/// Demo app: `/opt/app/www/index.html` template (`@VERSION@`).
pub(crate) const APP_INDEX: &str = include_str!("files/app-index.html");
/// Demo app: the conffile `/etc/app/app.conf`.
pub(crate) const APP_CONF: &str = include_str!("files/app.conf");
/// Demo app: its service line, `/etc/svc/app`.
pub(crate) const APP_SVC: &str = include_str!("files/app.svc");

/// Every embedded file with its name: all of them are part of the cache key.
pub(crate) const ALL: &[(&str, &str)] = &[
    ("guestinit", GUESTINIT),
    ("svc", SVC),
    ("initramfs-init", INITRAMFS_INIT),
    ("app-control", APP_CONTROL),
    ("app-postinst", APP_POSTINST),
    ("app-index.html", APP_INDEX),
    ("app.conf", APP_CONF),
    ("app.svc", APP_SVC),
];
