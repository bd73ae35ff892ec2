//! stagecore-vsphere (work in progress).
