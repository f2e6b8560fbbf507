//! Every frame a peer's bytes split into is at most the cap, holds no
//! newline, and reading never panics.
#![no_main]

use banger_proto::frame::read_frame;
use banger_proto::MAX_FRAME_BYTES;
use libfuzzer_sys::fuzz_target;

static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let rt = RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().unwrap());
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(frame)) = read_frame(&mut r).await {
            assert!(frame.len() <= MAX_FRAME_BYTES);
            assert!(!frame.contains(&b'\n'));
        }
    });
});
