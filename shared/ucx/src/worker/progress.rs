//! The progress thread: the only caller of UCX, serving the handles' commands.

use super::*;

pub(super) struct Progress {
    pub(super) worker: sys::ucp_worker_h,
    pub(super) efd: Option<RawFd>,
    pub(super) wake: Arc<WakeFd>,
    pub(super) shared: Weak<Shared>,
    pub(super) registered: Arc<AtomicUsize>,
    pub(super) inbound: Box<RefCell<Inbound>>,
    pub(super) endpoints: HashMap<u64, EndpointEntry>,
    pub(super) listeners: HashMap<u64, ListenerEntry>,
    /// Endpoint closes in flight, by sequence number.
    pub(super) closing: Rc<RefCell<BTreeSet<u64>>>,
    pub(super) close_seq: u64,
    pub(super) unmapped: VecDeque<Unmapped>,
    pub(super) freeing: Rc<Cell<bool>>,
    pub(super) next_id: u64,
    // Dropped last (declared last): the context outlives the worker.
    pub(super) context: Context,
}

impl Progress {
    pub(super) fn start(context: Context, shared: Weak<Shared>, wake: Arc<WakeFd>, registered: Arc<AtomicUsize>) -> Result<Self> {
        let params = sys::ucp_worker_params_t {
            field_mask: sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64,
            // Only this thread ever touches the worker.
            thread_mode: sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE,
            ..Default::default()
        };
        let mut worker = ptr::null_mut();
        // SAFETY: the context is live; `params` is valid for the call; `worker` receives the handle.
        check("ucp_worker_create", unsafe { sys::ucp_worker_create(context.raw(), &params, &mut worker) })?;
        let mut progress = Progress {
            worker,
            efd: None,
            wake,
            shared,
            registered,
            inbound: Box::default(),
            endpoints: HashMap::new(),
            listeners: HashMap::new(),
            closing: Rc::default(),
            close_seq: 0,
            unmapped: VecDeque::new(),
            freeing: Rc::default(),
            next_id: 1,
            context,
        };
        let handler = sys::ucp_am_handler_param_t {
            field_mask: (sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_FLAGS
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
                | sys::ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64,
            id: AM_ID,
            flags: sys::ucp_am_cb_flags_UCP_AM_FLAG_WHOLE_MSG,
            cb: Some(on_am),
            arg: progress.inbound_ptr() as *mut c_void,
        };
        // SAFETY: the worker is live and `arg` (the boxed Inbound) outlives it.
        check("ucp_worker_set_am_recv_handler", unsafe { sys::ucp_worker_set_am_recv_handler(worker, &handler) })?;
        let mut efd: libc::c_int = -1;
        // SAFETY: the worker is live; the fd stays owned by the worker.
        if unsafe { sys::ucp_worker_get_efd(worker, &mut efd) } == sys::ucs_status_t_UCS_OK && efd >= 0 {
            progress.efd = Some(efd);
        } else {
            tracing::warn!("UCX worker has no event fd; the progress thread will poll");
        }
        Ok(progress)
    }

    pub(super) fn inbound_ptr(&self) -> *const RefCell<Inbound> {
        &*self.inbound as *const RefCell<Inbound>
    }

    pub(super) fn run(&mut self, mut commands: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let mut busy = false;
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        self.handle(cmd);
                        busy = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.stop(),
                }
            }
            for _ in 0..64 {
                // SAFETY: the worker is live and this is its only thread.
                if unsafe { sys::ucp_worker_progress(self.worker) } == 0 {
                    break;
                }
                busy = true;
            }
            busy |= self.run_deferred();
            busy |= self.reap();
            if !busy {
                self.wait();
            }
        }
    }

    /// Sleeps until UCX or a command sender has something for us.
    pub(super) fn wait(&self) {
        let mut fds = [
            libc::pollfd { fd: self.wake.0.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.efd.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        let (count, timeout) = match self.efd {
            Some(_) => {
                // SAFETY: the worker is live and this is its only thread.
                match unsafe { sys::ucp_worker_arm(self.worker) } {
                    sys::ucs_status_t_UCS_OK => (2, IDLE_WAIT_MS),
                    sys::ucs_status_t_UCS_ERR_BUSY => return, // events are pending: progress again
                    _ => (1, 1),
                }
            }
            None => (1, 1),
        };
        // SAFETY: `fds` is a live array of at least `count` pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), count, timeout) };
        self.wake.drain();
    }

    pub(super) fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Listen { addr, reply } => {
                let _ = reply.send(self.listen(addr));
            }
            Cmd::CloseListener { id } => {
                if let Some(entry) = self.listeners.remove(&id) {
                    // SAFETY: the listener is live and destroyed once; its callback argument is
                    // freed only afterwards, when `entry` drops.
                    unsafe { sys::ucp_listener_destroy(entry.handle) };
                }
            }
            Cmd::Connect { addr, reply } => {
                let _ = reply.send(self.connect(addr));
            }
            Cmd::CloseEndpoint { id } => self.close_endpoint(id, false),
            Cmd::Send { ep, kind, data, reply } => self.send(ep, kind, data, reply),
            Cmd::Rma { ep, write, local, offset, len, remote, rkey, reply } => self.rma(ep, write, local, offset, len, remote, rkey, reply),
            Cmd::PutBytes { ep, data, remote, rkey, reply } => self.put_bytes(ep, data, remote, rkey, reply),
            Cmd::Flush { ep, reply } => self.flush(ep, reply),
            Cmd::Register { len, shared_memory, reply } => {
                let _ = reply.send(self.register(len, shared_memory));
            }
            Cmd::Unregister { memh, memory } => {
                // SAFETY: `memh` maps `memory`, which is still allocated; unmapped once. The
                // memory itself is freed later, by `reap`.
                let status = unsafe { sys::ucp_mem_unmap(self.context.raw(), memh as sys::ucp_mem_h) };
                if status != sys::ucs_status_t_UCS_OK {
                    tracing::warn!(status = ucx_rs::status_string(status), "ucp_mem_unmap failed");
                }
                self.registered.fetch_sub(1, Ordering::AcqRel);
                self.unmapped.push_back(Unmapped { after_close: self.close_seq, memory });
            }
            Cmd::Unpack { ep, packed, reply } => {
                let _ = reply.send(self.unpack(ep, &packed));
            }
            Cmd::DestroyRkey { rkey } => {
                // SAFETY: the key came from ucp_ep_rkey_unpack on this worker and no operation
                // uses it any more (operations hold the key's Arc); destroyed once.
                unsafe { sys::ucp_rkey_destroy(rkey as sys::ucp_rkey_h) };
            }
            Cmd::Retain { ep, region } => match self.endpoints.get_mut(&ep) {
                Some(entry) => entry.retained.push(region),
                None => drop(region), // already closed: nothing can write into it any more
            },
        }
    }

    pub(super) fn handle_for<T>(&self, make: impl FnOnce(Arc<Shared>) -> T) -> Result<T> {
        self.shared.upgrade().map(make).ok_or(Error::WorkerGone)
    }

    pub(super) fn listen(&mut self, addr: SocketAddr) -> Result<Listener> {
        let id = self.next_id();
        let arg = Box::new(ListenerArg { inbound: self.inbound_ptr(), id });
        let raw = RawSockAddr::new(addr);
        let params = sys::ucp_listener_params_t {
            field_mask: (sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_SOCK_ADDR
                | sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64,
            sockaddr: raw.as_ucs(),
            conn_handler: sys::ucp_listener_conn_handler_t { cb: Some(on_connection), arg: &*arg as *const ListenerArg as *mut c_void },
            ..Default::default()
        };
        let mut handle = ptr::null_mut();
        // SAFETY: the worker is live; the socket address is valid for the call (UCX copies it);
        // the handler argument is boxed and kept until the listener is destroyed.
        check("ucp_listener_create", unsafe { sys::ucp_listener_create(self.worker, &params, &mut handle) })?;
        let mut attr = sys::ucp_listener_attr_t {
            field_mask: sys::ucp_listener_attr_field_UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64,
            ..Default::default()
        };
        // SAFETY: the listener was just created; `attr` is a valid out-parameter.
        let bound = match check("ucp_listener_query", unsafe { sys::ucp_listener_query(handle, &mut attr) }) {
            Ok(()) => from_storage(&attr.sockaddr).unwrap_or(addr),
            Err(e) => {
                // SAFETY: destroying the listener we just created, once.
                unsafe { sys::ucp_listener_destroy(handle) };
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners.insert(id, ListenerEntry { handle, _arg: arg, accepted: tx });
        self.handle_for(|shared| Listener { id, addr: bound, shared, incoming: tokio::sync::Mutex::new(rx) })
    }

    pub(super) fn err_handler(&self) -> sys::ucp_err_handler_t {
        sys::ucp_err_handler_t { cb: Some(on_ep_error), arg: self.inbound_ptr() as *mut c_void }
    }

    pub(super) fn connect(&mut self, addr: SocketAddr) -> Result<Endpoint> {
        let raw = RawSockAddr::new(addr);
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_FLAGS
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_SOCK_ADDR
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            flags: sys::ucp_ep_params_flags_field_UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
            sockaddr: raw.as_ucs(),
            err_mode: sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER,
            err_handler: self.err_handler(),
            ..Default::default()
        };
        let mut ep = ptr::null_mut();
        // SAFETY: the worker is live; the address is valid for the call; the error handler's
        // argument (the boxed Inbound) outlives the endpoint.
        check("ucp_ep_create", unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) })?;
        self.adopt(ep)
    }

    pub(super) fn accept(&mut self, listener: u64, request: sys::ucp_conn_request_h) {
        let Some(entry) = self.listeners.get(&listener) else {
            return;
        };
        let accepted = entry.accepted.clone();
        let params = sys::ucp_ep_params_t {
            field_mask: (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_CONN_REQUEST
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64,
            conn_request: request,
            err_mode: sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER,
            err_handler: self.err_handler(),
            ..Default::default()
        };
        let mut ep = ptr::null_mut();
        // SAFETY: the connection request came from this worker's listener callback and is
        // consumed exactly once, here.
        let status = unsafe { sys::ucp_ep_create(self.worker, &params, &mut ep) };
        if status != sys::ucs_status_t_UCS_OK {
            tracing::warn!(status = ucx_rs::status_string(status), "cannot accept a UCX connection");
            return;
        }
        match self.adopt(ep) {
            // If nobody accepts any more, dropping the endpoint queues its close.
            Ok(endpoint) => drop(accepted.send(endpoint)),
            Err(e) => tracing::debug!(error = %e, "accepted a UCX connection while stopping"),
        }
    }

    /// Registers a new endpoint's route and wraps it in a handle.
    pub(super) fn adopt(&mut self, ep: sys::ucp_ep_h) -> Result<Endpoint> {
        let id = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.inbound.borrow_mut().routes.insert(ep as usize, Route { id, inbox: tx });
        self.endpoints.insert(id, EndpointEntry { ep, retained: Vec::new() });
        match self.shared.upgrade() {
            Some(shared) => Ok(Endpoint { id, shared, inbox: tokio::sync::Mutex::new(Inbox { rx, error: None }) }),
            None => {
                self.close_endpoint(id, true);
                Err(Error::WorkerGone)
            }
        }
    }

    pub(super) fn close_endpoint(&mut self, id: u64, force: bool) {
        let Some(entry) = self.endpoints.remove(&id) else {
            return;
        };
        let failed = {
            let mut inbound = self.inbound.borrow_mut();
            inbound.routes.remove(&(entry.ep as usize));
            inbound.failed.remove(&id).is_some()
        };
        // A failed endpoint can only be released forcibly; a healthy one is flushed and
        // disconnected from the peer.
        let force = force || failed;
        self.close_seq += 1;
        self.closing.borrow_mut().insert(self.close_seq);
        let op = Op {
            name: "ucp_ep_close_nbx",
            reply: None,
            _keep: Keep::Close(Closing { id: self.close_seq, in_flight: self.closing.clone(), _retained: entry.retained }),
        };
        let flags = if force { sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE } else { 0 };
        let (op, param) = Self::op_param(op, flags);
        // SAFETY: the endpoint is live and closed once; `param` carries the boxed op, reclaimed
        // below or in `op_done`.
        let status = unsafe { sys::ucp_ep_close_nbx(entry.ep, &param) };
        self.finish(status, op);
    }

    /// The request parameters for a boxed op with the completion callback; returns the leaked box.
    pub(super) fn op_param(op: Op, flags: u32) -> (*mut Op, sys::ucp_request_param_t) {
        let op = Box::into_raw(Box::new(op));
        let mut param = sys::ucp_request_param_t {
            op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: op as *mut c_void,
            ..Default::default()
        };
        param.cb.send = Some(op_done);
        if flags != 0 {
            param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = flags;
        }
        (op, param)
    }

    /// Settles an op after its *_nbx call: done or failed now (the callback will not run, so the
    /// box is reclaimed here), or in progress (the callback owns the box).
    pub(super) fn finish(&self, status: sys::ucs_status_ptr_t, op: *mut Op) {
        let outcome = decode(status);
        if outcome != Ok(true) {
            // SAFETY: no request was created, so UCX will not call `op_done`: this is the only
            // owner of the box.
            let op = unsafe { Box::from_raw(op) };
            op.complete(outcome.err().unwrap_or(sys::ucs_status_t_UCS_OK));
        }
    }

    /// A live, healthy endpoint to start an operation on.
    pub(super) fn endpoint(&self, id: u64) -> Result<sys::ucp_ep_h> {
        let entry = self.endpoints.get(&id).ok_or(Error::Closed)?;
        match self.inbound.borrow().failed.get(&id) {
            Some(e) => Err(e.clone()),
            None => Ok(entry.ep),
        }
    }

    pub(super) fn send(&mut self, ep: u64, kind: u16, data: Vec<u8>, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (ptr, len) = (data.as_ptr(), data.len());
        let header = kind.to_le_bytes();
        let op = Op { name: "ucp_am_send_nbx", reply: Some(reply), _keep: Keep::Bytes(data) };
        let flags = sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_REPLY | sys::ucp_send_am_flags_UCP_AM_SEND_FLAG_COPY_HEADER;
        let (op, param) = Self::op_param(op, flags);
        // SAFETY: the endpoint is live; the header is copied during the call (COPY_HEADER); the
        // payload is owned by the op, which lives until the send completes.
        let status = unsafe { sys::ucp_am_send_nbx(ep, AM_ID, header.as_ptr() as *const c_void, 2, ptr as *const c_void, len, &param) };
        self.finish(status, op);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rma(
        &mut self,
        ep: u64,
        write: bool,
        local: Arc<RegionInner>,
        offset: usize,
        len: usize,
        remote: u64,
        rkey: Arc<RkeyInner>,
        reply: Reply<()>,
    ) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        // SAFETY: `Endpoint::rma` checked that offset + len fits the region.
        let buffer = unsafe { local.ptr.as_ptr().add(offset) } as *mut c_void;
        let (memh, key) = (local.memh as sys::ucp_mem_h, rkey.rkey as sys::ucp_rkey_h);
        let name = if write { "ucp_put_nbx" } else { "ucp_get_nbx" };
        let op = Op { name, reply: Some(reply), _keep: Keep::Rma(local, rkey) };
        let (op, mut param) = Self::op_param(op, 0);
        param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_MEMH;
        param.memh = memh;
        // SAFETY: the endpoint and key are live; the local range is inside a registered region
        // that the op keeps alive (with the key) until the operation completes.
        let status = unsafe {
            if write {
                sys::ucp_put_nbx(ep, buffer, len, remote, key, &param)
            } else {
                sys::ucp_get_nbx(ep, buffer, len, remote, key, &param)
            }
        };
        self.finish(status, op);
    }

    pub(super) fn put_bytes(&mut self, ep: u64, data: Bytes, remote: u64, rkey: Arc<RkeyInner>, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (buffer, len, key) = (data.as_ptr() as *const c_void, data.len(), rkey.rkey as sys::ucp_rkey_h);
        let op = Op { name: "ucp_put_nbx", reply: Some(reply), _keep: Keep::Put(data, rkey) };
        let (op, param) = Self::op_param(op, 0);
        // SAFETY: the endpoint and key are live; the source bytes are immutable and owned by the
        // op (with the key) until the operation completes.
        let status = unsafe { sys::ucp_put_nbx(ep, buffer, len, remote, key, &param) };
        self.finish(status, op);
    }

    pub(super) fn flush(&mut self, ep: u64, reply: Reply<()>) {
        let ep = match self.endpoint(ep) {
            Ok(ep) => ep,
            Err(e) => return drop(reply.send(Err(e))),
        };
        let (op, param) = Self::op_param(Op { name: "ucp_ep_flush_nbx", reply: Some(reply), _keep: Keep::Nothing }, 0);
        // SAFETY: the endpoint is live; the op is reclaimed in `finish` or `op_done`.
        let status = unsafe { sys::ucp_ep_flush_nbx(ep, &param) };
        self.finish(status, op);
    }

    pub(super) fn register(&mut self, len: usize, shared_memory: bool) -> Result<MemRegion> {
        let (memh, memory) = match shared_memory.then(|| self.map_allocated(len)).flatten() {
            Some(mapped) => mapped,
            None => self.map_heap(len)?,
        };
        let mut packed = ptr::null_mut();
        let mut size = 0usize;
        // SAFETY: `memh` was just mapped on this context; on success `packed` holds `size` bytes
        // that we copy and release.
        let status = unsafe { sys::ucp_rkey_pack(self.context.raw(), memh, &mut packed, &mut size) };
        if status != sys::ucs_status_t_UCS_OK {
            // SAFETY: undoing the mapping made above, once.
            unsafe { sys::ucp_mem_unmap(self.context.raw(), memh) };
            return Err(Error::ucx("ucp_rkey_pack", status));
        }
        // SAFETY: see above.
        let rkey = unsafe { std::slice::from_raw_parts(packed as *const u8, size) }.to_vec();
        // SAFETY: the packed buffer came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(packed) };
        self.registered.fetch_add(1, Ordering::AcqRel);
        let ptr = memory.ptr;
        let inner = |shared| RegionInner { ptr, len, memh: memh as usize, rkey, memory: Some(memory), shared };
        match self.shared.upgrade() {
            Some(shared) => Ok(MemRegion { inner: Arc::new(inner(shared)) }),
            None => Err(Error::WorkerGone), // unreachable while a command is being served
        }
    }

    /// Heap memory of `len` zeroed bytes, mapped for remote access.
    pub(super) fn map_heap(&mut self, len: usize) -> Result<(sys::ucp_mem_h, HostMemory)> {
        let memory = HostMemory::alloc(len)?;
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64,
            address: memory.ptr.as_ptr() as *mut c_void,
            length: len,
            ..Default::default()
        };
        let mut memh = ptr::null_mut();
        // SAFETY: the range is allocated and stays so until after the matching unmap.
        check("ucp_mem_map", unsafe { sys::ucp_mem_map(self.context.raw(), &params, &mut memh) })?;
        Ok((memh, memory))
    }

    /// Memory that UCX allocates and maps itself (see [`Worker::allocate`]); `None` when it
    /// cannot, or when what it allocated is not plain host memory of at least `len` bytes.
    pub(super) fn map_allocated(&mut self, len: usize) -> Option<(sys::ucp_mem_h, HostMemory)> {
        let params = sys::ucp_mem_map_params_t {
            field_mask: (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH
                | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_FLAGS) as u64,
            length: len,
            flags: sys::UCP_MEM_MAP_ALLOCATE,
            ..Default::default()
        };
        let mut memh = ptr::null_mut();
        // SAFETY: no address is given, so UCX allocates; the handle is unmapped once, by the
        // region's drop (or just below).
        if unsafe { sys::ucp_mem_map(self.context.raw(), &params, &mut memh) } != sys::ucs_status_t_UCS_OK {
            return None;
        }
        let mut attr = sys::ucp_mem_attr_t {
            field_mask: (sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_ADDRESS | sys::ucp_mem_attr_field_UCP_MEM_ATTR_FIELD_LENGTH) as u64,
            ..Default::default()
        };
        // SAFETY: `memh` was just mapped; `attr` is writable.
        let queried = unsafe { sys::ucp_mem_query(memh, &mut attr) } == sys::ucs_status_t_UCS_OK;
        match NonNull::new(attr.address as *mut u8).filter(|_| queried && attr.length >= len) {
            Some(ptr) => Some((memh, HostMemory { ptr, len, by_ucx: true })),
            None => {
                // SAFETY: undoing the mapping made above, once.
                unsafe { sys::ucp_mem_unmap(self.context.raw(), memh) };
                None
            }
        }
    }

    pub(super) fn unpack(&mut self, id: u64, packed: &[u8]) -> Result<RemoteKey> {
        let ep = self.endpoint(id)?;
        let mut rkey = ptr::null_mut();
        // SAFETY: the endpoint is live; `packed` is readable for the call.
        check("ucp_ep_rkey_unpack", unsafe { sys::ucp_ep_rkey_unpack(ep, packed.as_ptr() as *const c_void, &mut rkey) })?;
        let key = rkey as usize;
        match self.shared.upgrade() {
            Some(shared) => Ok(RemoteKey { inner: Arc::new(RkeyInner { rkey: key, ep: id, shared }) }),
            None => {
                // SAFETY: destroying the key just unpacked, once.
                unsafe { sys::ucp_rkey_destroy(rkey) };
                Err(Error::WorkerGone)
            }
        }
    }

    /// Acts on what callbacks deferred; true if there was anything.
    pub(super) fn run_deferred(&mut self) -> bool {
        let deferred = std::mem::take(&mut self.inbound.borrow_mut().deferred);
        let any = !deferred.is_empty();
        for item in deferred {
            match item {
                Deferred::Connection { listener, request } => self.accept(listener, request as sys::ucp_conn_request_h),
                Deferred::Rendezvous { ep, kind, desc, len } => self.fetch(ep, kind, desc as *mut c_void, len),
            }
        }
        any
    }

    /// Fetches the payload of a rendezvous active message.
    pub(super) fn fetch(&mut self, ep: usize, kind: u16, desc: *mut c_void, len: usize) {
        let route = self.inbound.borrow().routes.get(&ep).cloned();
        let Some(route) = route else {
            // SAFETY: the descriptor was kept (UCS_INPROGRESS) and is released once, here.
            unsafe { sys::ucp_am_data_release(self.worker, desc) };
            return;
        };
        let mut op = Box::new(RecvOp { kind, buf: vec![0u8; len], inbox: route.inbox });
        let buf = op.buf.as_mut_ptr() as *mut c_void;
        let op = Box::into_raw(op);
        let mut param = sys::ucp_request_param_t {
            op_attr_mask: sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA,
            user_data: op as *mut c_void,
            ..Default::default()
        };
        param.cb.recv_am = Some(recv_done);
        // SAFETY: the descriptor is a kept rendezvous descriptor of this worker (UCX takes it
        // over); the buffer holds `len` bytes and is owned by the op until completion.
        let status = unsafe { sys::ucp_am_recv_data_nbx(self.worker, desc, buf, len, &param) };
        match decode(status) {
            Ok(true) => {} // `recv_done` completes it
            outcome => {
                // SAFETY: no request was created, so `recv_done` will not run.
                let op = unsafe { Box::from_raw(op) };
                op.complete(outcome.err().unwrap_or(sys::ucs_status_t_UCS_OK), len);
            }
        }
    }

    /// Frees unregistered memory once nothing can write into it any more.
    ///
    /// Over TCP and shared memory, a remote put is a plain copy into the address the peer names:
    /// nothing checks it against registrations. An endpoint being closed (for instance dropped
    /// together with a region its peer was writing into) can still deliver such data until its
    /// transport endpoints are destroyed, which UCX finishes in the background. So memory
    /// unregistered while a close was in flight waits for that close, then for a worker flush,
    /// which completes only once UCX has destroyed the transport endpoints it was discarding.
    /// (Writes from a peer whose endpoint stays open are the protocol's business: see
    /// [`Endpoint::retain`].)
    pub(super) fn reap(&mut self) -> bool {
        if self.freeing.get() || self.unmapped.is_empty() {
            return false;
        }
        let oldest_close = self.closing.borrow().first().copied();
        let mut memory = Vec::new();
        while let Some(next) = self.unmapped.front() {
            if oldest_close.is_some_and(|oldest| oldest <= next.after_close) {
                break;
            }
            memory.extend(self.unmapped.pop_front().map(|u| u.memory));
        }
        if memory.is_empty() {
            return false;
        }
        self.freeing.set(true);
        let op =
            Op { name: "ucp_worker_flush_nbx", reply: None, _keep: Keep::Free(Freeing { busy: self.freeing.clone(), _memory: memory }) };
        let (op, param) = Self::op_param(op, 0);
        // SAFETY: the worker is live; the op (owning the memory to free) is reclaimed in `finish`
        // or `op_done`.
        let status = unsafe { sys::ucp_worker_flush_nbx(self.worker, &param) };
        self.finish(status, op);
        true
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Every handle is gone: release what is left and let UCX finish its closes.
    pub(super) fn stop(&mut self) {
        for (_, entry) in self.listeners.drain() {
            // SAFETY: live listener, destroyed once.
            unsafe { sys::ucp_listener_destroy(entry.handle) };
        }
        let ids: Vec<u64> = self.endpoints.keys().copied().collect();
        for id in ids {
            self.close_endpoint(id, true);
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.closing.borrow().is_empty() && Instant::now() < deadline {
            // SAFETY: live worker, its own thread.
            if unsafe { sys::ucp_worker_progress(self.worker) } == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let pending = self.closing.borrow().len();
        if pending > 0 {
            tracing::warn!(pending, "UCX endpoint closes did not finish before the worker stopped");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // SAFETY: the worker is live and destroyed once, on its own thread. The memory still
        // waiting in `unmapped` is freed after this body (nothing can write into it any more),
        // and the context is cleaned up last.
        unsafe { sys::ucp_worker_destroy(self.worker) };
    }
}
