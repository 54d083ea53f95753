//! TEMPORARY stub (drop at merge): the real `sources` module is written on the `sources` branch.
//! Only the API the CLI calls is here, so that `lqa pull` / `lqa models` compile on this branch.

use std::path::PathBuf;

use crate::{Error, Result};

/// A model `lqa pull` knows by name.
pub struct KnownModel {
    pub name: String,
    pub description: String,
    /// Where it is cached, if it has been pulled.
    pub cached: Option<PathBuf>,
}

/// Download (or find in the cache) the model `name`; returns its folder.
pub fn pull(name: &str) -> Result<PathBuf> {
    Err(Error::UnknownModel {
        name: name.to_string(),
        hint: "model sources are not part of this build yet (stub)".to_string(),
    })
}

/// The models `lqa pull` knows by name.
pub fn known_models() -> Vec<KnownModel> {
    Vec::new()
}
