//! The UCP application context.

use std::ffi::CString;
use std::ptr;

use ucx_rs::sys;

use crate::{check, Error, Result};

/// A UCP context (`ucp_init`) with the active-message, RMA and wakeup features.
///
/// A context is handed to exactly one [`crate::Worker`], whose progress thread then makes every
/// further call on it, so the context needs no UCX-level locking.
pub struct Context {
    handle: sys::ucp_context_h,
}

// SAFETY: a UCP context is a heap object with no affinity to the thread that created it. This
// crate never uses one from two threads at once: it is created on the caller's thread, then moved
// into the worker's progress thread, which is its only user from then on and also cleans it up.
unsafe impl Send for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

struct Config(*mut sys::ucp_config_t);

impl Drop for Config {
    fn drop(&mut self) {
        // SAFETY: the descriptor came from a successful ucp_config_read and is released once.
        unsafe { sys::ucp_config_release(self.0) }
    }
}

impl Context {
    /// A context configured from the environment (`UCX_TLS`, `UCX_NET_DEVICES`, ...).
    pub fn new() -> Result<Self> {
        Self::with_options(&[])
    }

    /// A context configured from the environment, then overridden by `options`, given as UCX
    /// variable names without the `UCX_` prefix, e.g. `[("TLS", "tcp")]`.
    pub fn with_options(options: &[(&str, &str)]) -> Result<Self> {
        let mut raw = ptr::null_mut();
        // SAFETY: a null prefix and a null file name are documented as "environment only";
        // `raw` receives a descriptor on success, which `Config` releases.
        check("ucp_config_read", unsafe { sys::ucp_config_read(ptr::null(), ptr::null(), &mut raw) })?;
        let config = Config(raw);
        for (name, value) in options {
            let name = CString::new(*name).map_err(|_| Error::Invalid(format!("bad UCX option name {name:?}")))?;
            let value = CString::new(*value).map_err(|_| Error::Invalid(format!("bad UCX option value {value:?}")))?;
            // SAFETY: `config.0` is a live descriptor; both strings are NUL-terminated and
            // outlive the call, which copies them.
            check("ucp_config_modify", unsafe { sys::ucp_config_modify(config.0, name.as_ptr(), value.as_ptr()) })?;
        }
        let params = sys::ucp_params_t {
            field_mask: sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64,
            features: (sys::ucp_feature_UCP_FEATURE_AM | sys::ucp_feature_UCP_FEATURE_RMA | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64,
            ..Default::default()
        };
        let mut handle = ptr::null_mut();
        // SAFETY: `ucp_init` is a header inline over `ucp_init_version`; `params` and `config`
        // are valid for the call and `handle` receives the context on success.
        let status = unsafe { sys::ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, config.0, &mut handle) };
        check("ucp_init", status)?;
        Ok(Context { handle })
    }

    pub(crate) fn raw(&self) -> sys::ucp_context_h {
        self.handle
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful ucp_init; its worker (if any) has been
        // destroyed before, because the worker's thread owns the context and drops it last.
        unsafe { sys::ucp_cleanup(self.handle) }
    }
}
