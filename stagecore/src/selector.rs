//! [`Selector`]: which existing machines form an environment, for [`crate::Backend::attach`].

use serde::{Deserialize, Serialize};

/// Which existing machines form an environment, for [`crate::Backend::attach`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Selector {
    /// An environment the backend already knows by name.
    Environment {
        /// Its name.
        name: String,
    },
    /// Named hypervisor-level machines, grouped under a new environment name.
    Machines {
        /// The environment name to give the group.
        environment: String,
        /// Hypervisor-level machine names (domain / VM names).
        names: Vec<String>,
    },
    /// Machines carrying a label (libvirt metadata, vSphere tag), grouped under a name.
    Label {
        /// The environment name to give the group.
        environment: String,
        /// Label key.
        key: String,
        /// Label value.
        value: String,
    },
    /// Machines in a folder (vSphere).
    Folder {
        /// The environment name to give the group.
        environment: String,
        /// The folder.
        folder: String,
    },
}

impl Selector {
    /// The environment name this selector gives.
    pub fn environment(&self) -> &str {
        match self {
            Selector::Environment { name } => name,
            Selector::Machines { environment, .. }
            | Selector::Label { environment, .. }
            | Selector::Folder { environment, .. } => environment,
        }
    }
}
