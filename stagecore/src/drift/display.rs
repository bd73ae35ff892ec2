//! A human-readable table for [`DriftReport`].

use std::fmt;

use super::report::{DriftReport, RecordKind, Side, Status};

fn status(s: Status) -> &'static str {
    match s {
        Status::InSync => "IN_SYNC",
        Status::Drifted => "DRIFTED",
        Status::NotChecked => "NOT_CHECKED",
        Status::Informational => "INFORMATIONAL",
    }
}

fn kind(k: RecordKind) -> &'static str {
    match k {
        RecordKind::Add => "ADD",
        RecordKind::Remove => "REMOVE",
        RecordKind::NotEqual => "NOT_EQUAL",
    }
}

fn side(s: Option<Side>) -> &'static str {
    match s {
        Some(Side::Production) => "production",
        Some(Side::Stage) => "stage",
        Some(Side::Both) => "BOTH (conflict)",
        None => "-",
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl fmt::Display for DriftReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "drift of stage {} against {} (baseline {}): {} — match {:.1} %",
            self.stage,
            self.production,
            self.baseline,
            status(self.status),
            self.score
        )?;
        writeln!(
            f,
            "  {:<12} {:<12} {:>7} {:>12} {:>6} {:<12}",
            "MACHINE", "STATUS", "CONFIG", "DISK DRIFT", "GUEST", "GUEST STATUS"
        )?;
        for m in &self.machines {
            writeln!(
                f,
                "  {:<12} {:<12} {:>7} {:>12} {:>6} {:<12}",
                m.machine,
                status(m.status),
                m.config_drift,
                bytes(m.disk_drift_bytes),
                m.guest_drift,
                status(m.guest)
            )?;
        }
        writeln!(f, "  config: {}", status(self.config.status))?;
        for r in &self.config.records {
            writeln!(
                f,
                "    {:<9} {:<40} production={} stage={} [{}{}]",
                kind(r.kind),
                r.path,
                r.expected,
                r.actual,
                side(Some(r.side)),
                if r.intended { ", intended" } else { "" }
            )?;
        }
        writeln!(f, "  disk: {}", status(self.disk.status))?;
        for r in &self.disk.records {
            if r.status == Status::NotChecked {
                writeln!(f, "    {}/{}: NOT_CHECKED ({})", r.machine, r.disk, r.reason.as_deref().unwrap_or("?"))?;
            } else if r.status == Status::Informational {
                writeln!(
                    f,
                    "    {}/{}: INFORMATIONAL production +{}, stage +{} (running guest, judged by its guest layer)",
                    r.machine,
                    r.disk,
                    bytes(r.production.bytes),
                    bytes(r.stage.bytes),
                )?;
            } else if r.side.is_some() {
                writeln!(
                    f,
                    "    {}/{}: production +{}, stage +{} ({} intended), drift {} [{}{}]",
                    r.machine,
                    r.disk,
                    bytes(r.production.bytes),
                    bytes(r.stage.bytes),
                    bytes(r.intended_bytes),
                    bytes(r.drifted_bytes),
                    side(r.side),
                    if r.intended { ", intended" } else { "" }
                )?;
            }
        }
        write!(f, "  guest: {}", status(self.guest.status))?;
        if let Some(reason) = &self.guest.reason {
            write!(f, " ({reason})")?;
        }
        for r in &self.guest.records {
            write!(
                f,
                "\n    {:<9} {:<40} production={} stage={} [{}{}]",
                kind(r.kind),
                r.path,
                r.expected,
                r.actual,
                r.side.map_or("side unknown", |s| side(Some(s))),
                if r.intended { ", intended" } else { "" }
            )?;
        }
        Ok(())
    }
}
