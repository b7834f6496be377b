//! How command senders wake the progress thread.

use super::*;

/// A non-blocking eventfd: how command senders wake the progress thread.
pub(super) struct WakeFd(pub(super) OwnedFd);

impl WakeFd {
    pub(super) fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; a non-negative return is a new descriptor that we then own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(WakeFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter (EAGAIN)
        // already means "wake up", so the result needs no handling.
        unsafe { libc::write(self.0.as_raw_fd(), &one as *const u64 as *const c_void, 8) };
    }

    pub(super) fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; non-blocking, so an empty counter returns EAGAIN.
        unsafe { libc::read(self.0.as_raw_fd(), &mut value as *mut u64 as *mut c_void, 8) };
    }
}
