//! The generators a worker can drive.

pub mod comfyui;
pub mod sim;
pub mod wan2gp;

#[cfg(test)]
mod documented;
