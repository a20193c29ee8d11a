//! The Kuksa source against an in-test kuksa.val.v2 server generated from the same proto
//! (the server stubs ship with `kuksa-rust-sdk`). The server knows a VSS 5 tree (no 4.x
//! cable alias, no VSS 6 ControlUnit), so the first Subscribe fails with NOT_FOUND like a
//! real databroker would; it then sends the broker's empty first response, good values, a
//! value of the wrong type, an out-of-range value and an unknown path, and closes the stream
//! to force a reconnect.
#![cfg(feature = "kuksa")]

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kuksa_rust_sdk::v2_proto::val_server::{Val, ValServer};
use kuksa_rust_sdk::v2_proto::value::TypedValue;
use kuksa_rust_sdk::v2_proto::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use tokenfleet_vehicle::signals::path;
use tokenfleet_vehicle::source::kuksa::{KuksaConfig, KuksaSource};
use tokenfleet_vehicle::*;

type Rsp<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Broker {
    known: HashSet<String>,
    subscriptions: Arc<AtomicU32>,
}

fn dp(v: TypedValue, secs: i64) -> Datapoint {
    Datapoint {
        timestamp: Some(prost_timestamp(secs)),
        value: Some(Value {
            typed_value: Some(v),
        }),
    }
}

fn prost_timestamp(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

fn entries(pairs: Vec<(&str, Datapoint)>) -> SubscribeResponse {
    SubscribeResponse {
        entries: pairs
            .into_iter()
            .map(|(p, d)| (p.to_string(), d))
            .collect::<HashMap<_, _>>(),
    }
}

#[tonic::async_trait]
impl Val for Broker {
    type SubscribeStream = BoxStream<SubscribeResponse>;
    type SubscribeByIdStream = BoxStream<SubscribeByIdResponse>;
    type OpenProviderStreamStream = BoxStream<OpenProviderStreamResponse>;

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Rsp<Self::SubscribeStream> {
        let paths = req.into_inner().signal_paths;
        if let Some(p) = paths.iter().find(|p| !self.known.contains(*p)) {
            return Err(Status::not_found(format!("{p} not found")));
        }
        let n = self.subscriptions.fetch_add(1, Ordering::SeqCst);
        // the broker's first response: every subscribed path, no values
        let mut msgs = vec![SubscribeResponse {
            entries: paths
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        Datapoint {
                            timestamp: None,
                            value: None,
                        },
                    )
                })
                .collect(),
        }];
        if paths.len() > 1 {
            if n <= 1 + self.known.len() as u32 {
                msgs.push(entries(vec![
                    (
                        path::SELECTED_GEAR,
                        dp(TypedValue::Int32(126), 1_748_865_600),
                    ),
                    (path::SOC, dp(TypedValue::Float(71.5), 1_748_865_600)),
                    (
                        path::LOW_VOLTAGE_SYSTEM_STATE,
                        dp(TypedValue::String("OFF".into()), 1_748_865_600),
                    ),
                    (
                        path::IS_CHARGING_CABLE_CONNECTED,
                        dp(TypedValue::Bool(true), 1_748_865_600),
                    ),
                ]));
                // wrong type, out of range, unknown path: logged and ignored
                msgs.push(entries(vec![(
                    path::SOC,
                    dp(TypedValue::String("full".into()), 1_748_865_601),
                )]));
                msgs.push(entries(vec![(
                    path::SPEED,
                    dp(TypedValue::Bool(true), 1_748_865_601),
                )]));
                msgs.push(entries(vec![(
                    path::SOC,
                    dp(TypedValue::Float(180.0), 1_748_865_601),
                )]));
                msgs.push(entries(vec![(
                    "Vehicle.Cabin.Infotainment.Media.Volume",
                    dp(TypedValue::Uint32(7), 1_748_865_601),
                )]));
                msgs.push(entries(vec![(
                    path::SOC,
                    dp(TypedValue::Double(71.0), 1_748_865_602),
                )]));
                // then the stream ends: the source must reconnect
            } else {
                msgs.push(entries(vec![(
                    path::SOC,
                    dp(TypedValue::Float(70.5), 1_748_865_700),
                )]));
                msgs.push(entries(vec![(
                    path::SELECTED_GEAR,
                    dp(TypedValue::Int32(127), 1_748_865_701),
                )]));
                // keep the stream open afterwards
                let s = tokio_stream::StreamExt::chain(
                    tokio_stream::iter(msgs.into_iter().map(Ok)),
                    tokio_stream::pending(),
                );
                return Ok(Response::new(Box::pin(s)));
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(
            msgs.into_iter().map(Ok),
        ))))
    }

    async fn get_value(&self, _: Request<GetValueRequest>) -> Rsp<GetValueResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn get_values(&self, _: Request<GetValuesRequest>) -> Rsp<GetValuesResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn subscribe_by_id(
        &self,
        _: Request<SubscribeByIdRequest>,
    ) -> Rsp<Self::SubscribeByIdStream> {
        Err(Status::unimplemented("test broker"))
    }
    async fn actuate(&self, _: Request<ActuateRequest>) -> Rsp<ActuateResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn actuate_stream(
        &self,
        _: Request<tonic::Streaming<ActuateRequest>>,
    ) -> Rsp<ActuateResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn batch_actuate(&self, _: Request<BatchActuateRequest>) -> Rsp<BatchActuateResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn list_metadata(&self, _: Request<ListMetadataRequest>) -> Rsp<ListMetadataResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn publish_value(&self, _: Request<PublishValueRequest>) -> Rsp<PublishValueResponse> {
        Err(Status::unimplemented("test broker"))
    }
    async fn open_provider_stream(
        &self,
        _: Request<tonic::Streaming<OpenProviderStreamRequest>>,
    ) -> Rsp<Self::OpenProviderStreamStream> {
        Err(Status::unimplemented("test broker"))
    }
    async fn get_server_info(
        &self,
        _: Request<GetServerInfoRequest>,
    ) -> Rsp<GetServerInfoResponse> {
        Err(Status::unimplemented("test broker"))
    }
}

#[tokio::test]
async fn kuksa_source_subscribes_ignores_bad_entries_and_reconnects() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("tokenfleet_vehicle=debug")
        .try_init();
    // a VSS 5 broker: no 4.x alias, no VSS 6 ControlUnit signals
    let known: HashSet<String> = Signal::SUBSCRIBE_PATHS
        .iter()
        .filter(|p| **p != path::IS_CHARGING_CABLE_CONNECTED_V4 && !p.contains("ControlUnit"))
        .map(|p| p.to_string())
        .collect();
    let subscriptions = Arc::new(AtomicU32::new(0));
    let broker = Broker {
        known: known.clone(),
        subscriptions: subscriptions.clone(),
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ValServer::new(broker))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let mut cfg = KuksaConfig::new(format!("http://{addr}"));
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let mut src = KuksaSource::new(cfg).unwrap();
    let mut st = VehicleState::new();
    let mut got = vec![];
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < 7 {
            let u = src
                .next_update()
                .await
                .unwrap()
                .expect("kuksa source never ends");
            st.apply(u).unwrap();
            got.push(u);
        }
    })
    .await;
    assert!(res.is_ok(), "timed out; got {got:?}");

    // the good values arrived, typed and timestamped by the broker
    let socs: Vec<f64> = got
        .iter()
        .filter(|u| u.path == Signal::StateOfCharge)
        .filter_map(|u| u.value.as_f64())
        .collect();
    assert_eq!(
        socs,
        vec![71.5, 71.0, 70.5],
        "bad SoC values were dropped, good ones kept in order"
    );
    assert!(got.iter().any(|u| u.path == Signal::LowVoltageSystemState
        && u.value == SignalValue::LowVoltage(LowVoltageSystemState::Off)));
    assert!(got
        .iter()
        .any(|u| u.path == Signal::ChargingCableConnected && u.value == SignalValue::Bool(true)));
    let gear = got
        .iter()
        .rev()
        .find(|u| u.path == Signal::SelectedGear)
        .unwrap();
    assert_eq!(gear.value, SignalValue::Int(127));
    assert_eq!(gear.at, Millis::from_secs(1_748_865_701));
    assert!(
        got.iter().all(|u| u.path != Signal::Speed),
        "Speed=true was a wrong type"
    );
    // wrong type (2), out of range (1), unknown path (1), on the first connection
    assert_eq!(src.ignored(), 4);
    // NOT_FOUND fallback, then a reconnect after the broker closed the first stream
    assert_eq!(src.connects(), 2);
    assert!(
        subscriptions.load(Ordering::SeqCst) as usize > known.len(),
        "probed each path"
    );
    assert_eq!(
        st.selected_gear(Millis::from_secs(1_748_865_702)).fresh(),
        Some(127)
    );

    // close the client's stream first: graceful shutdown waits for open connections
    drop(src);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

#[tokio::test]
async fn kuksa_source_backs_off_while_the_broker_is_down() {
    // a port with nothing listening
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let mut cfg = KuksaConfig::new(format!("http://{addr}"));
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(40);
    let mut src = KuksaSource::new(cfg).unwrap();
    // no crash, no error: it keeps retrying
    let r = tokio::time::timeout(Duration::from_millis(300), src.next_update()).await;
    assert!(r.is_err(), "still retrying");
    assert_eq!(src.connects(), 0);
    assert!(KuksaSource::new(KuksaConfig::new("not a uri at all")).is_err());
}
