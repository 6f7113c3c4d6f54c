//! The generators a worker can drive.

pub mod comfyui;
pub mod sim;
