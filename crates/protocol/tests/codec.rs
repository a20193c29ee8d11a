//! Byte-exact codec tests: the encoding of each message family is pinned, so an accidental
//! change to field numbers or types (a wire break for deployed vehicles) fails here.

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
