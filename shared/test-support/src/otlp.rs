//! An OTLP trace receiver for tests and benchmarks: the collector's gRPC `TraceService` (as
//! Jaeger v2 and the OpenTelemetry Collector serve it on 4317) and OTLP/HTTP protobuf
//! (`POST /v1/traces`, as on 4318), keeping every span it is sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One received span, flattened: ids in lower-case hex, attributes as JSON values.
#[derive(Debug, Clone)]
pub struct Span {
    /// The resource's `service.name`.
    pub service: String,
    pub resource: HashMap<String, Value>,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// 1 internal, 2 server, 3 client (OTLP's numbering).
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: HashMap<String, Value>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    pub events: Vec<(String, HashMap<String, Value>)>,
}

impl Span {
    /// An attribute as an integer, if it is one.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attributes.get(key).and_then(Value::as_i64)
    }

    /// An attribute as text, if it is text.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }

    pub fn millis(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e6
    }

    pub fn to_json(&self) -> Value {
        json!({
            "service": self.service, "name": self.name, "trace_id": self.trace_id, "span_id": self.span_id,
            "parent_span_id": self.parent_span_id, "kind": self.kind, "start_ns": self.start_ns, "end_ns": self.end_ns,
            "attributes": self.attributes, "status_code": self.status_code, "status_message": self.status_message,
            "resource": self.resource,
        })
    }
}

type Store = Arc<Mutex<Vec<Span>>>;

/// A running receiver; it stops when dropped.
pub struct OtlpSink {
    /// Where OTLP/gRPC is served (give it as `http://{grpc}`).
    pub grpc: SocketAddr,
    /// Where OTLP/HTTP is served (give it as `http://{http}`).
    pub http: SocketAddr,
    spans: Store,
    requests: Arc<Mutex<u64>>,
    stop: CancellationToken,
}

impl Drop for OtlpSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Grpc {
    spans: Store,
    requests: Arc<Mutex<u64>>,
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.spans, &self.requests, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl OtlpSink {
    /// Binds both protocols on 127.0.0.1 (ports chosen by the system) and serves them.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0", "127.0.0.1:0").await
    }

    pub async fn start_on(grpc: &str, http: &str) -> std::io::Result<Self> {
        let spans: Store = Arc::default();
        let requests = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let g = TcpListener::bind(grpc).await?;
        let h = TcpListener::bind(http).await?;
        let (grpc, http) = (g.local_addr()?, h.local_addr()?);
        let svc = TraceServiceServer::new(Grpc { spans: spans.clone(), requests: requests.clone() });
        let stopping = stop.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(g);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, stopping.cancelled_owned())
                .await;
        });
        let (store, count) = (spans.clone(), requests.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (store, count) = (store.clone(), count.clone());
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            keep(&store, &count, req);
                            let resp = ExportTraceServiceResponse { partial_success: None };
                            ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], resp.encode_to_vec()).into_response()
                        }
                        Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()).into_response(),
                    }
                }
            }),
        );
        let stopping = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(h, app).with_graceful_shutdown(stopping.cancelled_owned()).await;
        });
        Ok(Self { grpc, http, spans, requests, stop })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }

    /// Export requests received.
    pub fn requests(&self) -> u64 {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves what was received on `listener` in the shape of Jaeger's query API, for a stack
    /// that has this receiver where Jaeger would be: `GET /api/services` and
    /// `GET /api/traces/{trace id}` (404 for a trace it has no span of).
    pub fn serve_query(&self, listener: TcpListener) {
        let (spans, list) = (self.spans.clone(), self.spans.clone());
        let app = axum::Router::new()
            .route(
                "/api/services",
                axum::routing::get(move || {
                    let spans = list.clone();
                    async move {
                        let mut names: Vec<String> =
                            spans.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|s| s.service.clone()).collect();
                        names.sort();
                        names.dedup();
                        axum::Json(json!({"data": names, "total": names.len()}))
                    }
                }),
            )
            .route(
                "/api/traces/{id}",
                axum::routing::get(move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let spans = spans.clone();
                    async move {
                        let trace: Vec<Span> =
                            spans.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|s| s.trace_id == id).cloned().collect();
                        if trace.is_empty() {
                            return (
                                axum::http::StatusCode::NOT_FOUND,
                                axum::Json(json!({"data": [], "errors": [{"code": 404, "msg": "trace not found"}]})),
                            );
                        }
                        (axum::http::StatusCode::OK, axum::Json(jaeger_trace(&id, &trace)))
                    }
                }),
            );
        let stopping = self.stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stopping.cancelled_owned()).await;
        });
    }
}

/// One trace as Jaeger's query API returns it: spans with their references, tags and process.
fn jaeger_trace(id: &str, spans: &[Span]) -> Value {
    let mut services: Vec<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    services.sort();
    services.dedup();
    let process = |service: &str| format!("p{}", services.iter().position(|s| *s == service).unwrap_or(0) + 1);
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let references: Vec<Value> = if s.parent_span_id.is_empty() {
                Vec::new()
            } else {
                vec![json!({"refType": "CHILD_OF", "traceID": id, "spanID": s.parent_span_id})]
            };
            let tags: Vec<Value> = s.attributes.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            json!({
                "traceID": id, "spanID": s.span_id, "operationName": s.name, "references": references,
                "startTime": s.start_ns / 1000, "duration": s.end_ns.saturating_sub(s.start_ns) / 1000,
                "tags": tags, "processID": process(&s.service),
            })
        })
        .collect();
    let processes: serde_json::Map<String, Value> = services.iter().map(|s| (process(s), json!({"serviceName": s, "tags": []}))).collect();
    json!({"data": [{"traceID": id, "spans": spans, "processes": processes}], "total": 1})
}

fn keep(store: &Store, requests: &Mutex<u64>, req: ExportTraceServiceRequest) {
    *requests.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").and_then(Value::as_str).unwrap_or("").to_string();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let status = s.status.unwrap_or_default();
                out.push(Span {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    attributes: attributes(&s.attributes),
                    status_code: status.code,
                    status_message: status.message,
                    events: s.events.into_iter().map(|e| (e.name, attributes(&e.attributes))).collect(),
                });
            }
        }
    }
    store.lock().unwrap_or_else(|e| e.into_inner()).extend(out);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().and_then(|v| v.value.as_ref()).map_or(Value::Null, value))).collect()
}

fn value(v: &AnyValue) -> Value {
    match v {
        AnyValue::StringValue(s) => json!(s),
        AnyValue::BoolValue(b) => json!(b),
        AnyValue::IntValue(i) => json!(i),
        AnyValue::DoubleValue(d) => json!(d),
        AnyValue::ArrayValue(a) => Value::Array(a.values.iter().map(|x| x.value.as_ref().map_or(Value::Null, value)).collect()),
        AnyValue::KvlistValue(l) => Value::Object(attributes(&l.values).into_iter().collect()),
        AnyValue::BytesValue(b) => json!(hex(b)),
        #[allow(unreachable_patterns)]
        _ => Value::Null,
    }
}
