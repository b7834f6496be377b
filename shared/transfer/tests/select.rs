//! Choosing among transports: the first common one, falling back only when nothing was sent.

mod common;

use common::{handoff, tcp_receiver, LEASE};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_transfer::{Handoff, HandoffRegistry, KvTransport, TcpTransport, TransferError, TransferReport, TransportSet};

/// A transport that fails the way it is told to, counting its calls (the neighbour under test is
/// the selection logic; the real transports have their own tests).
struct Failing {
    name: &'static str,
    error: TransferError,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl KvTransport for Failing {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn send(&self, _: &str, _: &Handoff, _: Duration) -> Result<TransferReport, TransferError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(self.error.clone())
    }
}

fn accept_next(registry: &HandoffRegistry, id: &str) -> tokio::task::JoinHandle<()> {
    let mut pending = registry.register(id).unwrap();
    tokio::spawn(async move {
        if let Some(i) = pending.arrived().await {
            let _ = i.verdict.send(Ok(()));
        }
    })
}

#[tokio::test]
async fn falls_back_when_the_preferred_transport_cannot_connect() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    let ucx =
        Arc::new(Failing { name: "ucx", error: TransferError::Connect { peer: "x".into(), reason: "no route".into() }, calls: 0.into() });
    let set = TransportSet::new(vec![ucx.clone(), Arc::new(TcpTransport)]);
    let accept = accept_next(&registry, "a");
    let report = set.send(&format!("ucx://127.0.0.1:1,tcp://{addr}"), &handoff("a", 4), LEASE).await.unwrap();
    accept.await.unwrap();
    assert_eq!(report.transport, "tcp");
    assert_eq!(ucx.calls.load(Ordering::SeqCst), 1);

    // A receiver that offers only TCP never sees the preferred transport tried.
    let accept = accept_next(&registry, "b");
    assert_eq!(set.send(&addr, &handoff("b", 4), LEASE).await.unwrap().transport, "tcp");
    accept.await.unwrap();
    assert_eq!(ucx.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_after_connecting_is_final() {
    let registry = HandoffRegistry::new();
    let (addr, _stop) = tcp_receiver(&registry).await;
    let ucx = Arc::new(Failing { name: "ucx", error: TransferError::Io("connection reset mid-payload".into()), calls: 0.into() });
    let set = TransportSet::new(vec![ucx.clone(), Arc::new(TcpTransport)]);
    let err = set.send(&format!("ucx://127.0.0.1:1,tcp://{addr}"), &handoff("c", 4), LEASE).await.unwrap_err();
    assert!(matches!(err, TransferError::Io(_)), "{err}");
    assert_eq!(registry.waiting(), 0);
}

#[tokio::test]
async fn no_common_transport_is_a_clear_error() {
    let set = TransportSet::new(vec![Arc::new(TcpTransport)]);
    let err = set.send("quic://127.0.0.1:1#sha256=00", &handoff("d", 4), LEASE).await.unwrap_err();
    assert!(err.to_string().contains("no common transport"), "{err}");
}
