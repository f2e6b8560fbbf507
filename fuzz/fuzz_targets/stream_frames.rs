//! What a guest (or a client) can send over the stream protocol
//! (generation 2): any bytes. Decoding never panics, never yields a payload
//! over the cap, and every typed view of a frame (numbers, sizes, signals,
//! session output, JSON control frames) decodes or is refused.
#![no_main]

use banger_proto::methods::agent::{ExitStatus, SessionInfo, SessionList};
use banger_proto::stream::{self, Attached, Open, SessionEnd, Started, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(f)) = stream::read(&mut r).await {
            assert!(f.payload.len() <= MAX_PAYLOAD);
            let _ = f.parse_u32();
            if let Ok(s) = f.parse_signal() {
                assert!((1..=64).contains(&s));
            }
            let _ = f.parse_resize();
            if let Ok((seq, stream, bytes)) = f.parse_output() {
                assert!((1..=2).contains(&stream));
                let _ = seq.checked_add(bytes.len() as u64);
            }
            let _ = f.parse_json::<Open>();
            let _ = f.parse_json::<Started>();
            let _ = f.parse_json::<Attached>();
            let _ = f.parse_json::<SessionEnd>();
            let _ = f.parse_json::<SessionInfo>();
            let _ = f.parse_json::<SessionList>();
            if let Ok(st) = f.parse_json::<ExitStatus>() {
                assert!((0..=255).contains(&st.shell_code()));
            }
        }
    });
});
