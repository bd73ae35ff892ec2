//! stagecore-libvirt (work in progress).
