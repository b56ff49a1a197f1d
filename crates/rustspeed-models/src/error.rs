//! Errors of building and loading models.

use crate::hf_config::HfConfigError;
use crate::params::LayoutError;
use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value the model code does not implement (yet). Names the key and value.
    #[error("not supported yet: {what} = {value}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Unsupported {
        what: String,
        value: String,
        hint: Option<String>,
    },
    #[error(transparent)]
    Config(#[from] HfConfigError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}
