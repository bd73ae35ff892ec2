//! stagecore-qemu (work in progress).
