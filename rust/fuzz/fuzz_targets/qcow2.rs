#![no_main]
// Open the input as a qcow2 image (read-only, in memory) and exercise it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| qblock_fuzz::run(qblock_core::Format::Qcow2, data));
