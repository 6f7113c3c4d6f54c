//! The generators a worker can drive.

pub mod sim;
pub mod comfyui;
