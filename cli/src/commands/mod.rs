pub mod demo;
pub mod fleet;
pub mod jobs;
pub mod up;
pub mod man;
