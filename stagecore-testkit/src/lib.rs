//! stagecore conformance kit.
