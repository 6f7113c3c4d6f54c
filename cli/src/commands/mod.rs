pub mod demo;
pub mod fleet;
pub mod jobs;
pub mod man;
pub mod up;
