//! The envelope round-trips, and a command from a newer control plane decodes
//! with its kind unset (so the agent can answer UNSUPPORTED).

use prost::Message;
use proto::v1::{
    agent_message, command, control_message, reply, AgentMessage, Command, CommandResult,
    ControlMessage, Error, ErrorCode, Event, EventLevel, Heartbeat, Hello, Netmap, Peer, Ping,
    ProtocolVersion, Reply, Telemetry,
};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M) {
    let bytes = msg.encode_to_vec();
    let back = M::decode(bytes.as_slice()).expect("decodes what it encoded");
    assert_eq!(&back, msg);
}

#[test]
fn agent_messages_round_trip() {
    let hello = AgentMessage {
        body: Some(agent_message::Body::Hello(Hello {
            protocol_version: ProtocolVersion::ProtocolVersion1 as i32,
            telemetry: Some(Telemetry {
                agent_version: "0.1.0".into(),
                arch: "amd64".into(),
                traits: vec!["docker".into(), "amd64".into()],
                tags: vec!["eu".into()],
                cpus: 2,
                memory_bytes: 24 << 30,
                ..Default::default()
            }),
            applied_topology_version: 7,
            mesh: None,
        })),
    };
    round_trip(&hello);
    round_trip(&AgentMessage {
        body: Some(agent_message::Body::Heartbeat(Heartbeat {
            seq: 42,
            sent_at_ms: 1_700_000_000_000,
            telemetry: None,
        })),
    });
    round_trip(&AgentMessage {
        body: Some(agent_message::Body::Event(Event {
            kind: "agent.started".into(),
            level: EventLevel::Info as i32,
            message: "agent started".into(),
            at_ms: 1,
            fields: [("pid".to_owned(), "12".to_owned())].into(),
            request_id: String::new(),
            payload: None,
        })),
    });
    round_trip(&AgentMessage {
        body: Some(agent_message::Body::Reply(Reply {
            request_id: "r-1".into(),
            outcome: Some(reply::Outcome::Error(Error {
                code: ErrorCode::Unsupported as i32,
                message: "unknown command".into(),
            })),
        })),
    });
    round_trip(&AgentMessage {
        body: Some(agent_message::Body::Reply(Reply {
            request_id: "r-2".into(),
            outcome: Some(reply::Outcome::Result(CommandResult { kind: None })),
        })),
    });
}

#[test]
fn control_messages_round_trip() {
    round_trip(&ControlMessage {
        body: Some(control_message::Body::Netmap(Netmap {
            topology_version: 3,
            addresses: vec!["100.64.0.2/32".into()],
            peers: vec![Peer {
                public_key: "k".into(),
                endpoint: "127.0.0.1:51820".into(),
                allowed_ips: vec!["100.64.0.3/32".into()],
                persistent_keepalive_secs: 25,
                ..Default::default()
            }],
            ..Default::default()
        })),
    });
    round_trip(&ControlMessage {
        body: Some(control_message::Body::Command(Command {
            request_id: "r-9".into(),
            deadline_ms: 5_000,
            kind: Some(command::Kind::Ping(Ping {
                payload: b"hi".to_vec(),
            })),
        })),
    });
}

/// A newer control plane sends a command kind with a field number this build
/// does not know: the message still decodes, keeps its request id, and the
/// kind reads as unset.
#[test]
fn unknown_command_kind_decodes_as_unset() {
    let known = Command {
        request_id: "r-77".into(),
        deadline_ms: 0,
        kind: None,
    };
    let mut bytes = known.encode_to_vec();
    // Field 999, wire type 2 (length-delimited), 3 bytes of payload.
    prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut bytes);
    prost::encoding::encode_varint(3, &mut bytes);
    bytes.extend_from_slice(&[0x0a, 0x01, 0x41]);

    let decoded = Command::decode(bytes.as_slice()).expect("unknown fields are skipped");
    assert_eq!(decoded.request_id, "r-77");
    assert!(decoded.kind.is_none());
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for input in [&[0xff_u8, 0xff, 0xff][..], &[0x0a, 0x05, 0x01], &[0x12]] {
        assert!(AgentMessage::decode(input).is_err(), "{input:?}");
    }
}
