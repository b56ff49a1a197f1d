/// Placeholder until HF config parsing lands.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HfConfigError(pub String);
