//! What the progress thread keeps for UCX's callbacks, and the callbacks themselves: they run
//! inside `ucp_worker_progress` and touch only [`Inbound`].

use super::*;

/// Where incoming messages for one endpoint go.
#[derive(Clone)]
pub(super) struct Route {
    pub(super) id: u64,
    pub(super) inbox: mpsc::UnboundedSender<Result<AmMessage>>,
}

/// Work that callbacks hand to the loop, because it needs UCX calls that do not belong inside
/// a callback.
pub(super) enum Deferred {
    Connection { listener: u64, request: usize },
    Rendezvous { ep: usize, kind: u16, desc: usize, len: usize },
}

/// The state callbacks may touch (see the module docs).
#[derive(Default)]
pub(super) struct Inbound {
    pub(super) routes: HashMap<usize, Route>,
    /// Endpoints whose error UCX reported, by id. No operation may be started on them: besides
    /// being pointless, UCX 1.22 can spin forever inside `ucp_am_send_nbx` on an endpoint that
    /// failed before it ever connected. Recorded by the error callback itself, so that no command
    /// can slip in between the failure and its record.
    pub(super) failed: HashMap<u64, Error>,
    pub(super) deferred: Vec<Deferred>,
}

pub(super) struct ListenerArg {
    pub(super) inbound: *const RefCell<Inbound>,
    pub(super) id: u64,
}

pub(super) struct ListenerEntry {
    pub(super) handle: sys::ucp_listener_h,
    pub(super) _arg: Box<ListenerArg>,
    pub(super) accepted: mpsc::UnboundedSender<Endpoint>,
}

pub(super) struct EndpointEntry {
    pub(super) ep: sys::ucp_ep_h,
    pub(super) retained: Vec<MemRegion>,
}

/// An endpoint close in flight: leaves the set of closes in flight when it completes, then
/// releases the regions the endpoint retained.
pub(super) struct Closing {
    pub(super) id: u64,
    pub(super) in_flight: Rc<RefCell<BTreeSet<u64>>>,
    pub(super) _retained: Vec<MemRegion>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        self.in_flight.borrow_mut().remove(&self.id);
    }
}

/// Unregistered memory waiting to be freed (see [`Progress::reap`]), with the last endpoint close
/// started when it was unregistered.
pub(super) struct Unmapped {
    pub(super) after_close: u64,
    pub(super) memory: HostMemory,
}

/// Memory being freed by a worker flush; clears the "flush in flight" flag once done.
pub(super) struct Freeing {
    pub(super) busy: Rc<Cell<bool>>,
    pub(super) _memory: Vec<HostMemory>,
}

impl Drop for Freeing {
    fn drop(&mut self) {
        self.busy.set(false);
    }
}

/// What an operation keeps alive until UCX is done with it.
pub(super) enum Keep {
    Nothing,
    Bytes(#[allow(dead_code)] Vec<u8>),
    Rma(#[allow(dead_code)] Arc<RegionInner>, #[allow(dead_code)] Arc<RkeyInner>),
    Put(#[allow(dead_code)] Bytes, #[allow(dead_code)] Arc<RkeyInner>),
    Close(#[allow(dead_code)] Closing),
    Free(#[allow(dead_code)] Freeing),
}

/// One operation in flight, passed to UCX as the callback's user data.
pub(super) struct Op {
    pub(super) name: &'static str,
    pub(super) reply: Option<Reply<()>>,
    pub(super) _keep: Keep,
}

impl Op {
    pub(super) fn complete(self, status: sys::ucs_status_t) {
        if let Some(reply) = self.reply {
            let _ = reply.send(check(self.name, status));
        }
    }
}

pub(super) unsafe extern "C" fn op_done(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    // SAFETY: `user_data` is the `Box<Op>` leaked when the operation returned a request, and UCX
    // invokes this callback exactly once for it.
    let op = unsafe { Box::from_raw(user_data as *mut Op) };
    op.complete(status);
    // SAFETY: the request was returned by a *_nbx call and is released exactly once, here.
    unsafe { sys::ucp_request_free(request) };
}

/// A rendezvous receive in flight.
pub(super) struct RecvOp {
    pub(super) kind: u16,
    pub(super) buf: Vec<u8>,
    pub(super) inbox: mpsc::UnboundedSender<Result<AmMessage>>,
}

impl RecvOp {
    pub(super) fn complete(self, status: sys::ucs_status_t, length: usize) {
        let RecvOp { kind, mut buf, inbox } = self;
        let message = check("ucp_am_recv_data_nbx", status).map(|()| {
            buf.truncate(length);
            AmMessage { kind, data: buf }
        });
        let _ = inbox.send(message);
    }
}

pub(super) unsafe extern "C" fn recv_done(request: *mut c_void, status: sys::ucs_status_t, length: usize, user_data: *mut c_void) {
    // SAFETY: as in `op_done`, for the leaked `Box<RecvOp>`.
    let op = unsafe { Box::from_raw(user_data as *mut RecvOp) };
    op.complete(status, length);
    // SAFETY: as in `op_done`.
    unsafe { sys::ucp_request_free(request) };
}

pub(super) unsafe extern "C" fn on_am(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    // SAFETY: `arg` is the worker's `Inbound`, which outlives the worker; `param` is valid for
    // the duration of the callback.
    let (inbound, param) = unsafe { (&*(arg as *const RefCell<Inbound>), &*param) };
    let has_reply_ep = param.recv_attr & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FIELD_REPLY_EP as u64 != 0;
    if !has_reply_ep || header_length < 2 {
        return sys::ucs_status_t_UCS_OK; // not ours: every message of this crate names its sender
    }
    let mut kind = [0u8; 2];
    // SAFETY: the header holds at least two readable bytes.
    unsafe { ptr::copy_nonoverlapping(header as *const u8, kind.as_mut_ptr(), 2) };
    let kind = u16::from_le_bytes(kind);
    let Ok(mut inbound) = inbound.try_borrow_mut() else {
        return sys::ucs_status_t_UCS_OK;
    };
    let ep = param.reply_ep as usize;
    let Some(route) = inbound.routes.get(&ep) else {
        return sys::ucs_status_t_UCS_OK; // the endpoint is being closed
    };
    if param.recv_attr & sys::ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
        // The payload is still at the sender: keep the descriptor and fetch it from the loop.
        inbound.deferred.push(Deferred::Rendezvous { ep, kind, desc: data as usize, len: length });
        return sys::ucs_status_t_UCS_INPROGRESS;
    }
    let payload = if length == 0 {
        Vec::new()
    } else {
        // SAFETY: for a non-rendezvous message `data` points to `length` readable bytes for the
        // duration of the callback.
        unsafe { std::slice::from_raw_parts(data as *const u8, length) }.to_vec()
    };
    let _ = route.inbox.send(Ok(AmMessage { kind, data: payload }));
    sys::ucs_status_t_UCS_OK
}

pub(super) unsafe extern "C" fn on_ep_error(arg: *mut c_void, ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    // SAFETY: `arg` is the worker's `Inbound`, which outlives every endpoint.
    let inbound = unsafe { &*(arg as *const RefCell<Inbound>) };
    if let Ok(mut inbound) = inbound.try_borrow_mut() {
        if let Some(route) = inbound.routes.remove(&(ep as usize)) {
            let error = Error::ucx("endpoint", status);
            let _ = route.inbox.send(Err(error.clone()));
            inbound.failed.insert(route.id, error);
        }
    }
}

pub(super) unsafe extern "C" fn on_connection(request: sys::ucp_conn_request_h, arg: *mut c_void) {
    // SAFETY: `arg` is the listener's boxed `ListenerArg`, alive until the listener is destroyed,
    // and its `inbound` outlives the worker.
    let (id, inbound) = unsafe {
        let arg = &*(arg as *const ListenerArg);
        (arg.id, &*arg.inbound)
    };
    if let Ok(mut inbound) = inbound.try_borrow_mut() {
        inbound.deferred.push(Deferred::Connection { listener: id, request: request as usize });
    }
}

pub(super) fn decode(status: sys::ucs_status_ptr_t) -> std::result::Result<bool, sys::ucs_status_t> {
    ucx_rs::decode_status_ptr(status).map(|request| request.is_some())
}
