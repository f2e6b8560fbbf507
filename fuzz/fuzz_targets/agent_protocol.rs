//! What a guest (root in the VM, so hostile) can send the host over the
//! agent protocol: answer frames, exec output, exit statuses, bulk result
//! lines. Decoding never panics, base64 output decodes or is refused, and
//! an exit status is always a shell code 0-255 that reads as success only
//! for a real 0.
#![no_main]

use banger_proto::methods::agent::{
    AgentHealth, BulkHeader, BulkResult, ExecOutput, ExitStatus, Line, Seeded,
};
use banger_proto::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use base64::Engine;
    let Ok(frame) = serde_json::from_slice::<Frame>(data) else {
        if let Ok(s) = std::str::from_utf8(data) {
            let _ = BulkResult::from_line(s);
            let _ = BulkHeader::from_line(s);
        }
        return;
    };
    match frame {
        Frame::Event { event } => {
            if let Ok(out) = serde_json::from_value::<ExecOutput>(event) {
                let _ = base64::engine::general_purpose::STANDARD.decode(&out.data_b64);
            }
        }
        Frame::Result { result, .. } => {
            if let Ok(st) = serde_json::from_value::<ExitStatus>(result.clone()) {
                let c = st.shell_code();
                assert!((0..=255).contains(&c));
                assert_eq!(c == 0, st.code == Some(0));
            }
            let _ = serde_json::from_value::<AgentHealth>(result.clone());
            let _ = serde_json::from_value::<Seeded>(result);
        }
        Frame::Error { error } => {
            let _ = error.to_string();
        }
        Frame::Heartbeat => {}
    }
});
