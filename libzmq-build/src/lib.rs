//! Links libzmq 4.3.5 with libsodium (CURVE) for the `zmq` crate; see build.rs.
//!
//! A crate that uses `zmq` depends on this one too and calls [`linked`] once, so the
//! linker keeps this crate (and the static libraries its build script emits).

// Keeps libsodium-sys-stable in the link: libzmq's CURVE calls into it.
extern crate libsodium_sys;

/// The libzmq version this crate built, as (major, minor, patch).
pub fn linked() -> (i32, i32, i32) {
    extern "C" {
        fn zmq_version(major: *mut i32, minor: *mut i32, patch: *mut i32);
    }
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: zmq_version only writes the three ints.
    unsafe { zmq_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// The CURVE public key of a secret key, or `None` when libzmq has no CURVE.
pub fn curve_public(secret: &[u8; 32]) -> Option<[u8; 32]> {
    extern "C" {
        fn zmq_curve_public(public: *mut u8, secret: *const u8) -> i32;
        fn zmq_z85_encode(dest: *mut u8, data: *const u8, size: usize) -> *mut u8;
        fn zmq_z85_decode(dest: *mut u8, string: *const u8) -> *mut u8;
    }
    let mut secret_z85 = [0u8; 41];
    let mut public_z85 = [0u8; 41];
    let mut public = [0u8; 32];
    // SAFETY: the buffers have the sizes libzmq documents (41 bytes for 32 bytes of
    // Z85 with its NUL, 32 bytes decoded).
    unsafe {
        if zmq_z85_encode(secret_z85.as_mut_ptr(), secret.as_ptr(), 32).is_null() {
            return None;
        }
        if zmq_curve_public(public_z85.as_mut_ptr(), secret_z85.as_ptr()) != 0 {
            return None;
        }
        if zmq_z85_decode(public.as_mut_ptr(), public_z85.as_ptr()).is_null() {
            return None;
        }
    }
    Some(public)
}
