//! Properties of the wire decoders, over generated input: whatever a peer
//! sends, decoding never panics, never yields a frame over the cap, and
//! every error carries a valid op id. The same decoders are fuzzed (see
//! `fuzz/`); these keep a lighter version in the normal test suite.

use banger_proto::frame::{decode_request, read_frame};
use banger_proto::methods::agent::{ExecRequest, ExitStatus, Seed};
use banger_proto::methods::daemon::{ImageImport, VmCreate, VmExec};
use banger_proto::methods::helper::{BridgeEnsure, GuestNet, TapCreate};
use banger_proto::server::decode_params;
use banger_proto::{Frame, OpId, Request, MAX_FRAME_BYTES};
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn frames_of(bytes: &[u8]) -> Vec<Result<Vec<u8>, String>> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = bytes;
        let mut out = Vec::new();
        loop {
            match read_frame(&mut r).await {
                Ok(None) => break,
                Ok(Some(f)) => out.push(Ok(f)),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn frames_split_on_newlines_and_never_exceed_the_cap(
        parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16),
    ) {
        let bytes = parts.concat();
        let frames = frames_of(&bytes);
        let mut joined = Vec::new();
        for f in &frames {
            match f {
                Ok(f) => {
                    prop_assert!(f.len() <= MAX_FRAME_BYTES);
                    prop_assert!(!f.contains(&b'\n'));
                    joined.extend_from_slice(f);
                    joined.push(b'\n');
                }
                Err(e) => prop_assert!(e.contains("closed in the middle"), "{e}"),
            }
        }
        // What was read as frames is exactly the input up to its last newline.
        let upto = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        prop_assert_eq!(&joined[..], &bytes[..upto]);
    }

    #[test]
    fn any_bytes_give_a_request_or_an_error_with_a_valid_op_id(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let op = match decode_request(&bytes) {
            Ok((op, _)) | Err((op, _)) => op,
        };
        prop_assert!(OpId::parse(op.as_str()).is_some(), "{}", op.as_str());
    }

    #[test]
    fn requests_round_trip_and_keep_a_valid_op_id(
        method in "[a-z.]{1,24}",
        version in any::<u32>(),
        op in proptest::option::of("op-[0-9a-f]{10}|[ -~]{0,12}"),
        params in json(),
    ) {
        let req = Request { version, method: method.clone(), params: params.clone(), op_id: op.clone() };
        let bytes = serde_json::to_vec(&req).unwrap();
        let (got_op, got) = match decode_request(&bytes) {
            Ok(r) => r,
            Err((_, e)) => return Err(TestCaseError::fail(e.message)),
        };
        prop_assert_eq!(got.method, method);
        prop_assert_eq!(got.version, version);
        prop_assert_eq!(got.params, params);
        match op.as_deref().and_then(OpId::parse) {
            Some(valid) => prop_assert_eq!(got_op, valid),
            None => prop_assert!(OpId::parse(got_op.as_str()).is_some()),
        }
    }

    #[test]
    fn typed_params_decode_or_refuse_without_panicking(v in json()) {
        macro_rules! all {
            ($($t:ty),*) => {$(
                if let Err(e) = decode_params::<$t>(v.clone()) {
                    prop_assert_eq!(e.code, banger_proto::ErrorCode::BadRequest);
                }
            )*};
        }
        all!(VmCreate, VmExec, ImageImport, ExecRequest, Seed, TapCreate, BridgeEnsure, GuestNet);
        // Anything but an object (or nothing) is refused outright.
        if !matches!(v, Value::Object(_) | Value::Null) {
            prop_assert!(decode_params::<VmCreate>(v.clone()).is_err());
        }
    }

    #[test]
    fn agent_frames_decode_or_refuse_and_exit_codes_stay_in_range(
        v in json(),
        code in proptest::option::of(any::<i32>()),
        signal in proptest::option::of(any::<i32>()),
    ) {
        let _ = serde_json::from_value::<Frame>(v);
        let c = ExitStatus { code, signal }.shell_code();
        prop_assert!((0..=255).contains(&c));
        // Only a real exit code of 0 reads as success.
        prop_assert_eq!(c == 0, code == Some(0));
    }
}

/// Every frame of the stream protocol in `bytes`, until the end or the
/// first error.
fn stream_frames(bytes: &[u8]) -> (Vec<banger_proto::stream::Frame>, bool) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = bytes;
        let mut out = Vec::new();
        loop {
            match banger_proto::stream::read(&mut r).await {
                Ok(None) => return (out, true),
                Ok(Some(f)) => out.push(f),
                Err(_) => return (out, false),
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Whatever bytes arrive, the stream decoder never panics and never
    /// yields a payload over the cap; frames it wrote come back the same.
    #[test]
    fn stream_frames_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (frames, _) = stream_frames(&bytes);
        for f in frames {
            prop_assert!(f.payload.len() <= banger_proto::stream::MAX_PAYLOAD);
            let _ = f.parse_u32();
            let _ = f.parse_resize();
            let _ = f.parse_signal();
            let _ = f.parse_json::<banger_proto::stream::Open>();
        }
    }

    #[test]
    fn stream_frames_round_trip(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8)) {
        use banger_proto::stream::{Frame, Kind};
        let sent: Vec<Frame> = chunks.into_iter().map(|c| Frame::new(Kind::Stdin, c)).collect();
        let wire: Vec<u8> = sent.iter().flat_map(|f| f.encode()).collect();
        let (got, clean) = stream_frames(&wire);
        prop_assert!(clean);
        prop_assert_eq!(got, sent);
    }
}
