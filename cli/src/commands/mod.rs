pub mod demo;
pub mod fleet;
pub mod jobs;
pub mod keys;
pub mod man;
pub mod params_help;
pub mod up;
