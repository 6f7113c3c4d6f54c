//! Helpers shared by the worker's integration tests. Each test binary uses a
//! different part of them.
#![allow(dead_code)]

pub mod comfy;
pub mod wan2gp;
