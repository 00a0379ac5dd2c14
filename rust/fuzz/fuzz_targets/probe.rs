#![no_main]
// Probe the input as `Image::open` without a format does (every format's
// probe, luks's too), then open it as the winner and exercise it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| qblock_fuzz::run_probed(data));
