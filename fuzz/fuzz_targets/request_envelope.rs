//! A frame decodes to a request or to an error, both with a valid op id,
//! and its params decode as every method's typed params or are refused as
//! a bad request: never a panic, never another code.
#![no_main]

use banger_proto::frame::decode_request;
use banger_proto::methods::{agent, daemon, helper};
use banger_proto::server::decode_params;
use banger_proto::{ErrorCode, OpId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (op, req) = match decode_request(data) {
        Ok((op, req)) => (op, Some(req)),
        Err((op, e)) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            (op, None)
        }
    };
    assert!(OpId::parse(op.as_str()).is_some());
    let Some(req) = req else { return };
    macro_rules! all {
        ($($t:ty),*) => {$(
            if let Err(e) = decode_params::<$t>(req.params.clone()) {
                assert_eq!(e.code, ErrorCode::BadRequest);
            }
        )*};
    }
    all!(
        daemon::VmCreate,
        daemon::VmRef,
        daemon::VmExec,
        daemon::VmLogsParams,
        daemon::OpRef,
        daemon::ImageBuild,
        daemon::ImageImport,
        daemon::ImageRegister,
        daemon::NameRef,
        helper::BridgeEnsure,
        helper::TapCreate,
        helper::LinkName,
        helper::GuestNet,
        helper::GuestRef,
        agent::ExecRequest,
        agent::Seed
    );
});
