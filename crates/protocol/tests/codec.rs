//! Byte-exact codec tests: the encoding of every message kind of both directions is pinned
//! (each with every field set, so no field hides behind its default), so an accidental change
//! to field numbers or types (a wire break for deployed vehicles) fails here. The expected
//! bytes were written with an independent protobuf encoder (a 20-line Python script over the
//! field numbers in `node.proto`), not read back from prost. [`every_kind_is_pinned`] stops
//! compiling when a kind is added, until its test is.

use prost::Message;
use tokenfleet_protocol::v1::{
    self, AgentMessage, Assign, ChatMessage, ChatMessages, CoordinatorMessage, Heartbeat, Sampling,
    TokenChunk,
};
use tokenfleet_protocol::{AgentMsg, CoordinatorMsg};

fn roundtrip_agent(msg: &AgentMessage) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    assert_eq!(&AgentMessage::decode(bytes.as_slice()).unwrap(), msg);
    bytes
}

fn roundtrip_coordinator(msg: &CoordinatorMessage) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    assert_eq!(&CoordinatorMessage::decode(bytes.as_slice()).unwrap(), msg);
    bytes
}

#[test]
fn heartbeat_bytes() {
    let m = AgentMessage::new(AgentMsg::Heartbeat(Heartbeat { sent_unix_ms: 300 }));
    // field 6 (heartbeat), length 3; inside: field 1 varint 300 = ac 02
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "3203".to_string() + "08ac02"
    );
}

#[test]
fn token_chunk_bytes() {
    let m = AgentMessage::new(AgentMsg::Chunk(TokenChunk {
        job_id: "j1".into(),
        start_index: 20,
        token_ids: vec![1, 300],
        texts: vec!["a".into(), "".into()],
        logprobs: vec![-0.5],
        top_logprobs: vec![],
        prompt_tokens: 0,
    }));
    let bytes = roundtrip_agent(&m);
    // 1a = field 3 (chunk), then: 0a 02 "j1" | 10 14 | 1a 03 01 ac 02 (packed ids) |
    // 22 01 "a" | 22 00 | 2a 04 00 00 00 bf (packed float -0.5)
    assert_eq!(
        hex::encode(bytes),
        "1a16".to_string()
            + "0a026a31"
            + "1014"
            + "1a0301ac02"
            + "220161"
            + "2200"
            + "2a04000000bf"
    );
}

#[test]
fn assign_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Assign(Assign {
        job_id: "j".into(),
        lease_deadline_unix_ms: 1,
        model: "m".into(),
        prompt: Some(v1::assign::Prompt::Chat(ChatMessages {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
        })),
        sampling: Some(Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 7,
        }),
        resume_token_ids: vec![5],
        max_tokens: 16,
        stop: vec![],
        logprobs: false,
        top_logprobs: 0,
        ignore_eos: false,
        interactive: true,
    }));
    let bytes = roundtrip_coordinator(&m);
    assert_eq!(
        hex::encode(bytes),
        "12".to_string()
            + "26"
            + "0a016a"
            + "1001"
            + "1a016d"
            + "220c0a0a0a04757365721202"
            + "6869"
            + "3a071500"
            + "00803f"
            + "2007"
            + "420105"
            + "4810"
            + "7001"
    );
}

#[test]
fn unknown_fields_from_a_newer_peer_are_skipped() {
    // A Heartbeat with an extra field 15 (varint 1) that this build does not know.
    let bytes = hex::decode("320508ac027801").unwrap();
    let m = AgentMessage::decode(bytes.as_slice()).unwrap();
    assert_eq!(
        m,
        AgentMessage::new(AgentMsg::Heartbeat(Heartbeat { sent_unix_ms: 300 }))
    );
}

#[test]
fn empty_message_has_no_payload() {
    assert!(AgentMessage { msg: None }.encode_to_vec().is_empty());
}

#[test]
fn cancel_with_hand_back_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Cancel(v1::Cancel {
        job_id: "j".into(),
        reason: "r".into(),
        hand_back: true,
    }));
    // 1a = field 3 (cancel), length 8: 0a 01 "j" | 12 01 "r" | 18 01 (hand_back = true)
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "1a08".to_string() + "0a016a" + "120172" + "1801"
    );
    // A plain cancel carries no hand_back byte, so older agents read it unchanged.
    let plain = CoordinatorMessage::new(CoordinatorMsg::Cancel(v1::Cancel {
        job_id: "j".into(),
        reason: "r".into(),
        hand_back: false,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&plain)),
        "1a06".to_string() + "0a016a" + "120172"
    );
}

/// The test that pins each message kind; an exhaustive match, so a new kind fails to compile
/// until it is listed (and pinned).
fn pinning_test_of(agent: Option<&AgentMsg>, coordinator: Option<&CoordinatorMsg>) -> &'static str {
    match (agent, coordinator) {
        (Some(m), _) => match m {
            AgentMsg::Hello(_) => "hello_bytes",
            AgentMsg::State(_) => "state_bytes",
            AgentMsg::Chunk(_) => "token_chunk_bytes",
            AgentMsg::Done(_) => "job_done_bytes",
            AgentMsg::Evicted(_) => "job_evicted_bytes",
            AgentMsg::Heartbeat(_) => "heartbeat_bytes",
            AgentMsg::Failed(_) => "job_failed_bytes",
            AgentMsg::Quote(_) => "attest_quote_bytes",
            AgentMsg::CertificateRequest(_) => "certificate_request_bytes",
        },
        (None, Some(m)) => match m {
            CoordinatorMsg::Welcome(_) => "welcome_bytes",
            CoordinatorMsg::Assign(_) => "assign_bytes",
            CoordinatorMsg::Cancel(_) => "cancel_with_hand_back_bytes",
            CoordinatorMsg::Drain(_) => "drain_bytes",
            CoordinatorMsg::Resend(_) => "resend_bytes",
            CoordinatorMsg::HeartbeatAck(_) => "heartbeat_ack_bytes",
            CoordinatorMsg::Attest(_) => "attest_challenge_bytes",
            CoordinatorMsg::RenewCertificate(_) => "renew_certificate_bytes",
            CoordinatorMsg::Certificate(_) => "certificate_issued_bytes",
        },
        (None, None) => "",
    }
}

#[test]
fn every_kind_is_pinned() {
    let source = include_str!("codec.rs");
    let agent = [
        AgentMsg::Hello(Default::default()),
        AgentMsg::State(Default::default()),
        AgentMsg::Chunk(Default::default()),
        AgentMsg::Done(Default::default()),
        AgentMsg::Evicted(Default::default()),
        AgentMsg::Heartbeat(Default::default()),
        AgentMsg::Failed(Default::default()),
        AgentMsg::Quote(Default::default()),
        AgentMsg::CertificateRequest(Default::default()),
    ];
    let coordinator = [
        CoordinatorMsg::Welcome(Default::default()),
        CoordinatorMsg::Assign(Default::default()),
        CoordinatorMsg::Cancel(Default::default()),
        CoordinatorMsg::Drain(Default::default()),
        CoordinatorMsg::Resend(Default::default()),
        CoordinatorMsg::HeartbeatAck(Default::default()),
        CoordinatorMsg::Attest(Default::default()),
        CoordinatorMsg::RenewCertificate(Default::default()),
        CoordinatorMsg::Certificate(Default::default()),
    ];
    let names: Vec<&str> = agent
        .iter()
        .map(|m| pinning_test_of(Some(m), None))
        .chain(coordinator.iter().map(|m| pinning_test_of(None, Some(m))))
        .collect();
    assert_eq!(names.len(), 18);
    for name in names {
        assert!(
            source.contains(&format!("fn {name}()")),
            "no byte-exact test {name}"
        );
    }
}

#[test]
fn hello_bytes() {
    let m = AgentMessage::new(AgentMsg::Hello(v1::Hello {
        node_id: "n".into(),
        software_version: "v".into(),
        protocol_version: 1,
        hardware: Some(v1::HardwareProfile {
            compute_class: "c".into(),
            cpu_threads: 2,
            memory_bytes: 3,
            decode_tps_single: 1.0,
            decode_tps_batched: 2.0,
        }),
        engine_slots: 4,
        models: vec![v1::ModelInfo {
            name: "m".into(),
            sha256: "s".into(),
            ctx_per_slot: 5,
            size_bytes: 6,
        }],
        held_jobs: vec![v1::HeldJob {
            job_id: "j".into(),
            next_index: 7,
        }],
    }));
    // 0a 30 (field 1, hello) | 0a01 "n" | 1201 "v" | 1801 | 22 11 hardware { 0a01 "c" | 1002 |
    // 1803 | 25 1.0f | 2d 2.0f } | 2804 | 32 0a model { 0a01 "m" | 1201 "s" | 1805 | 2006 } |
    // 3a 05 held { 0a01 "j" | 1007 }
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "0a30".to_string()
            + "0a016e120176180122110a016310021803250000803f2d00000040"
            + "2804320a0a016d120173180520063a050a016a1007"
    );
}

#[test]
fn state_bytes() {
    let m = AgentMessage::new(AgentMsg::State(v1::State {
        governor: v1::GovernorState::Eligible as i32,
        eligible: true,
        reason: "r".into(),
        parked: true,
        plugged_in: true,
        soc_pct: Some(50.0),
        soc_reserve_pct: 20.0,
        battery_temp_c: Some(25.0),
        compute_temp_c: Some(45.0),
        latitude: Some(1.5),
        longitude: Some(-2.5),
        link_rtt_ms: 30.0,
        slots_free: 3,
        compute_power_w: 10.0,
        expected_parked_s: 600,
        tariff_per_kwh: 0.25,
    }));
    // 12 46 (field 2, state); floats are fixed32 (wire type 5), lat/lon fixed64 (type 1);
    // field 16 needs a two-byte tag (85 01).
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "1246".to_string()
            + "080210011a017220012801"
            + "35000048423d0000a041450000c8414d00003442"
            + "51000000000000f83f5900000000000004c0"
            + "650000f0416803750000204178d804"
            + "85010000803e"
    );
}

#[test]
fn job_done_bytes() {
    let m = AgentMessage::new(AgentMsg::Done(v1::JobDone {
        job_id: "j".into(),
        finish_reason: v1::FinishReason::Length as i32,
        text_tail: "t".into(),
        next_index: 4,
        prompt_tokens: 5,
        queue_ms: 6,
        prefill_ms: 7,
        decode_ms: 8,
        energy_j: 1.5,
        energy_measured: true,
        grid_energy_j: 0.5,
        battery_energy_j: 1.0,
        battery_wear_usd: 0.25,
    }));
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "2238".to_string()
            + "0a016a10021a01742004280530063807400849000000000000f83f5001"
            + "59000000000000e03f61000000000000f03f69000000000000d03f"
    );
}

#[test]
fn job_evicted_bytes() {
    let m = AgentMessage::new(AgentMsg::Evicted(v1::JobEvicted {
        job_id: "j".into(),
        reason: "r".into(),
        next_index: 3,
    }));
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "2a08".to_string() + "0a016a" + "120172" + "1803"
    );
}

#[test]
fn job_failed_bytes() {
    let m = AgentMessage::new(AgentMsg::Failed(v1::JobFailed {
        job_id: "j".into(),
        message: "m".into(),
        retryable: true,
    }));
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "3a08".to_string() + "0a016a" + "12016d" + "1801"
    );
}

#[test]
fn attest_quote_bytes() {
    let m = AgentMessage::new(AgentMsg::Quote(v1::AttestQuote {
        attest: vec![1],
        signature_r: vec![2],
        signature_s: vec![3],
        log: vec![v1::Measurement {
            kind: v1::MeasurementKind::AgentBinary as i32,
            name: "a".into(),
            sha256: vec![4],
        }],
        unavailable: "u".into(),
    }));
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "4216".to_string()
            + "0a0101"
            + "120102"
            + "1a0103"
            + "2208"
            + "0801"
            + "120161"
            + "1a0104"
            + "2a0175"
    );
}

#[test]
fn certificate_request_bytes() {
    let m = AgentMessage::new(AgentMsg::CertificateRequest(v1::CertificateRequest {
        csr_pem: "c".into(),
    }));
    assert_eq!(
        hex::encode(roundtrip_agent(&m)),
        "4a03".to_string() + "0a0163"
    );
}

#[test]
fn welcome_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Welcome(v1::Welcome {
        node_id: "n".into(),
        heartbeat_interval_ms: 1000,
        lease_timeout_ms: 5000,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "0a09".to_string() + "0a016e" + "10e807" + "188827"
    );
}

#[test]
fn drain_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Drain(v1::Drain {
        reason: "r".into(),
        evict: true,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "2205".to_string() + "0a0172" + "1001"
    );
}

#[test]
fn resend_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Resend(v1::Resend {
        job_id: "j".into(),
        from_index: 9,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "2a05".to_string() + "0a016a" + "1009"
    );
}

#[test]
fn heartbeat_ack_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::HeartbeatAck(v1::HeartbeatAck {
        sent_unix_ms: 300,
        lease_deadline_unix_ms: 600,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "3206".to_string() + "08ac02" + "10d804"
    );
}

#[test]
fn attest_challenge_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Attest(v1::AttestChallenge {
        nonce: vec![5],
        pcr_index: 23,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "3a05".to_string() + "0a0105" + "1017"
    );
}

#[test]
fn renew_certificate_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::RenewCertificate(v1::RenewCertificate {}));
    // An empty message still says which kind it is: field 8, length 0.
    assert_eq!(hex::encode(roundtrip_coordinator(&m)), "4200");
}

#[test]
fn certificate_issued_bytes() {
    let m = CoordinatorMessage::new(CoordinatorMsg::Certificate(v1::CertificateIssued {
        cert_pem: "p".into(),
        not_after_unix_ms: 1000,
    }));
    assert_eq!(
        hex::encode(roundtrip_coordinator(&m)),
        "4a06".to_string() + "0a0170" + "10e807"
    );
}
